# A portal's Slurm scheduler, written for django_hpc_job_controller's client,
# in the shape of the seed's portals (the Bilby portal's, for one).
import json
import os

from scheduler.slurm import Slurm
from scheduler.status import JobStatus


class PortalSlurm(Slurm):
    def __init__(self, settings, ui_id, job_id):
        super().__init__(settings, ui_id, job_id)
        self.slurm_template = 'settings/portal_slurm.sh'
        self.nodes = 1
        self.tasks_per_node = 1
        self.memory = 64
        self.walltime = 60 * 60 + 2 * 60 + 7
        self.job_name = 'portal_' + str(ui_id)
        self.parameter_file = os.path.join(self.get_working_directory(), 'parameters.json')

    def generate_template_dict(self):
        params = super().generate_template_dict()
        params['parameter_file'] = self.parameter_file
        return params

    def submit(self, job_parameters):
        # The parameters as the portal passed them (a JSON string stays one).
        with open(self.parameter_file, 'w') as f:
            f.write(job_parameters if isinstance(job_parameters, str)
                    else json.dumps(job_parameters))
        # The seed's Slurm submits the rendered template and returns its id.
        return super().submit(job_parameters)

    def status(self):
        status, info = super().status()
        if status == JobStatus.COMPLETED:
            info = 'portal job finished'
        return status, info
