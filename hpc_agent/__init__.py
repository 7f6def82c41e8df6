"""The hpc-job-controller agent: runs on a cluster's login node.

It never imports Django or hpcd.  hpcd and the Django app import its shared
vocabulary (:mod:`hpc_agent.status`, :mod:`hpc_agent.wire`).
"""

__version__ = "0.1.0"
