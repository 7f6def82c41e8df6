# A portal's local scheduler, written for django_hpc_job_controller's client:
# only the seed's names are imported, and its shapes are followed (attributes
# set in __init__, submit as a hook, status as a (JobStatus, info) pair).
import json
import os

from scheduler.local import Local
from scheduler.status import JobStatus


class PortalLocal(Local):
    def __init__(self, settings, ui_id, job_id):
        super().__init__(settings, ui_id, job_id)
        self.local_template = 'settings/portal_local.sh'
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
        return super().submit(job_parameters)

    def status(self):
        status, info = super().status()
        if status == JobStatus.COMPLETED:
            info = 'portal job finished'
        return status, info
