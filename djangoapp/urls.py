"""URLs of the ready views for job files; include them under any prefix::

    path("hpc/", include("djangoapp.urls")),

and reverse them as ``hpc:job-files``, ``hpc:job-file``, ``hpc:job-archive``
and ``hpc:job-upload`` (see :mod:`djangoapp.views`).
"""

from django.urls import path

from djangoapp import views

app_name = "hpc"

urlpatterns = [
    path("<int:job_id>/files/", views.job_files, name="job-files"),
    path("<int:job_id>/files/<path:path>", views.job_file, name="job-file"),
    path("<int:job_id>/archive/", views.job_archive, name="job-archive"),
    path("<int:job_id>/upload/", views.job_upload, name="job-upload"),
]
