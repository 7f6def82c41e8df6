"""The portal's cluster side: a Local and a Slurm scheduler subclass with
%-templates, as a site wrote them for the seed's cluster client.

``settings/`` is laid out as the seed's client directory had it (an
``__init__.py``, the scheduler files, the templates); the files import only
the seed's module names (``scheduler.local``, ``scheduler.slurm``,
``scheduler.status``), which the agent resolves.  Each class writes the job
parameters, exactly as the portal passed them, to ``parameters.json`` in the
job's working directory, and its job copies them to ``result.txt``.

To run it in an agent directory::

    from seedportal.cluster import install
    scheduler_class = install(agent_dir, "slurm")   # or "local"
    # then HPC_SCHEDULER_CLASS = scheduler_class in the agent's settings.py
"""

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: HPC_SCHEDULER_CLASS for each scheduler, as the seed's settings named them.
CLASSES = {
    "local": "settings.portal_local.PortalLocal",
    "slurm": "settings.portal_slurm.PortalSlurm",
}


def install(agent_dir, kind):
    """Copy the portal's settings/ directory into an agent directory; return
    the HPC_SCHEDULER_CLASS value for ``kind`` ("local" or "slurm")."""
    shutil.copytree(HERE / "settings", Path(agent_dir) / "settings", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return CLASSES[kind]
