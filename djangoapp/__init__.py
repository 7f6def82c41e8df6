"""The Django side of hpc-job-controller: models, admin and the hpcd client.

Add ``"djangoapp"`` to ``INSTALLED_APPS`` and run ``migrate``; start the daemon
with ``twistd hpcd``.
"""
