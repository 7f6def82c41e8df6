"""Signals the app sends.

``job_status_changed(sender, job, old, new, detail, source)`` is sent once
per applied change of a job's state, after the transaction that stored it
commits, in the process that applied it: hpcd for the states a cluster
reports and for dispatching (PENDING -> SUBMITTING), the Django process for
submit(), cancel() and delete_job().  ``sender`` is the job's class (the
``HPC_JOB_CLASS`` in hpcd), ``job`` an instance of it as stored, ``old`` and
``new`` are JobStatus values and ``source`` is "django", "hpcd" or "agent".
A receiver that raises is logged and changes nothing: the state is stored.

Connect receivers where both processes import them (a models.py, or an
AppConfig.ready()), with ``sender=`` your job class::

    from django.dispatch import receiver
    from djangoapp.signals import job_status_changed

    @receiver(job_status_changed, sender=Job)
    def tell_the_owner(sender, job, old, new, detail, **kwargs):
        ...
"""

from django.dispatch import Signal

job_status_changed = Signal()
