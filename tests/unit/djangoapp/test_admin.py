"""The admin never shows stored credentials back and only edits through the API."""

import pytest
from django.contrib.auth.models import User
from django.test import Client

from djangoapp.models import HpcCluster, HpcJob, JobStatus


@pytest.fixture
def admin_client(db):
    User.objects.create_superuser("admin", "admin@example.org", "pw")
    client = Client()
    client.login(username="admin", password="pw")
    return client


def test_the_change_form_never_shows_the_stored_key_or_password(admin_client):
    cluster = HpcCluster.objects.create(host_name="hpc.example.org", client_path="/srv/a",
                                        username="u", key="-----BEGIN SECRET KEY-----",
                                        password="hunter2-passphrase")
    page = admin_client.get(f"/admin/djangoapp/hpccluster/{cluster.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "SECRET KEY" not in html and "hunter2" not in html and "fernet:" not in html


def test_saving_the_form_with_empty_credentials_keeps_them(admin_client):
    cluster = HpcCluster.objects.create(host_name="hpc.example.org", client_path="/srv/a",
                                        username="u", password="kept")
    response = admin_client.post(f"/admin/djangoapp/hpccluster/{cluster.pk}/change/", {
        "host_name": "hpc.example.org", "port": 22, "username": "u", "key": "",
        "password": "", "host_key": "", "client_path": "/srv/b", "enabled": "on"})
    assert response.status_code == 302, response.content[:2000]
    cluster.refresh_from_db()
    assert cluster.credentials()["password"] == "kept" and cluster.client_path == "/srv/b"
    admin_client.post(f"/admin/djangoapp/hpccluster/{cluster.pk}/change/", {
        "host_name": "hpc.example.org", "port": 22, "username": "u", "key": "",
        "password": "", "clear_credentials": "on", "host_key": "", "client_path": "/srv/b",
        "enabled": "on"})
    cluster.refresh_from_db()
    assert cluster.password == ""


def test_job_state_fields_are_read_only_in_the_admin(admin_client):
    job = HpcJob.objects.create(job_status=JobStatus.RUNNING)
    page = admin_client.get(f"/admin/djangoapp/hpcjob/{job.pk}/change/").content.decode()
    assert 'name="job_status"' not in page
    assert "Running" in page


def test_jobs_are_added_in_the_admin_only_as_the_job_class(admin_client, settings):
    assert admin_client.get("/admin/djangoapp/hpcjob/add/").status_code == 200
    settings.HPC_JOB_CLASS = "seedportal.Job"
    assert admin_client.get("/admin/djangoapp/hpcjob/add/").status_code == 403
