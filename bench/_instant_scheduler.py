"""A scheduler for bench/dispatch.py that accepts every job at once.

Never part of the product: the benchmark copies this file into its agent's
directory (files of a site's own go next to the agent's settings.py) and
names ``_instant_scheduler.Instant`` as HPC_SCHEDULER_CLASS.  A submission
returns an id without touching the disk, and the jobs then wait as in a
queue that never runs them (a poll cannot tell their state), so what the
benchmark measures is the path from the database to the agent and back to
SUBMITTED, not a scheduler.
"""

from hpc_agent.schedulers.base import Scheduler


class Instant(Scheduler):
    poll_fast_seconds = 60.0
    poll_slow_seconds = 60.0
    rate_limited = False

    def _submit(self, job_parameters):
        return f"instant-{self.ui_id}"

    def cancel(self):
        pass

    @classmethod
    def batch_status(cls, settings, jobs):
        return {}

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        return {ui_id: f"instant-{ui_id}" for ui_id in ui_ids}
