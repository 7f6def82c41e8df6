from django.urls import path

from portal import views

app_name = "portal"

urlpatterns = [
    path("", views.jobs, name="jobs"),
    path("jobs/states.json", views.job_states, name="job-states"),
    path("jobs/new/", views.submit, name="submit"),
    path("jobs/<int:job_id>/", views.job_detail, name="job"),
    path("jobs/<int:job_id>/cancel/", views.cancel, name="cancel"),
    path("jobs/<int:job_id>/delete/", views.delete, name="delete"),
    path("clusters/", views.clusters, name="clusters"),
    path("clusters/<int:cluster_id>/connect/", views.connect, name="connect"),
]
