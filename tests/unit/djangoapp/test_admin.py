"""The admin never shows stored credentials back and only edits through the API."""

import os
import socket
import tempfile

import pytest
from django.contrib.auth.models import User
from django.test import Client

from djangoapp.models import HpcCluster, HpcJob, JobStatus


@pytest.fixture
def short_private_dir():
    # Unix socket paths must stay under 108 bytes, in a directory only we write.
    with tempfile.TemporaryDirectory(prefix="hpc-") as path:
        yield path


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


# -- issue 9 item 1: view-only staff see no credentials and cannot act ----------------

SECRETS = ("-----BEGIN SECRET KEY-----", "hunter2-passphrase")


def _staff(name, *codenames):
    from django.contrib.auth.models import Permission

    user = User.objects.create_user(name, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="djangoapp",
                                                        codename__in=codenames))
    client = Client()
    client.login(username=name, password="pw")
    return client


@pytest.fixture
def viewer(db):
    return _staff("viewer", "view_hpccluster", "view_hpcjob")


@pytest.fixture
def secret_cluster(db):
    return HpcCluster.objects.create(host_name="hpc.example.org", client_path="/srv/a",
                                     username="u", key=SECRETS[0], password=SECRETS[1])


def _no_secrets(html):
    assert not any(s in html for s in SECRETS) and "fernet:" not in html, html[:200]


def test_a_view_only_user_sees_no_credential_on_any_cluster_page(viewer, secret_cluster):
    for url in ("/admin/djangoapp/hpccluster/",
                f"/admin/djangoapp/hpccluster/{secret_cluster.pk}/change/",
                f"/admin/djangoapp/hpccluster/{secret_cluster.pk}/history/"):
        page = viewer.get(url)
        assert page.status_code == 200, url
        _no_secrets(page.content.decode())
    page = viewer.get(f"/admin/djangoapp/hpccluster/{secret_cluster.pk}/change/")
    html = page.content.decode()
    # Whether one is set is shown; the stored value is not.
    assert "private key, password (set)" in html
    assert 'name="key"' not in html and 'name="password"' not in html


def test_a_user_who_may_change_gets_write_only_credential_fields(secret_cluster):
    editor = _staff("editor", "view_hpccluster", "change_hpccluster")
    html = editor.get(f"/admin/djangoapp/hpccluster/{secret_cluster.pk}/change/").content.decode()
    _no_secrets(html)
    assert 'name="key"' in html and 'name="password"' in html
    assert "private key, password (set)" in html



def test_a_view_only_user_is_offered_no_action(viewer, secret_cluster):
    HpcJob.objects.create(job_status=JobStatus.RUNNING, cluster=secret_cluster)
    clusters = viewer.get("/admin/djangoapp/hpccluster/").content.decode()
    jobs = viewer.get("/admin/djangoapp/hpcjob/").content.decode()
    for name in ("pin_host_keys", "connect_now"):
        assert f'value="{name}"' not in clusters
    for name in ("cancel_jobs", "delete_job_data", "delete_selected"):
        assert f'value="{name}"' not in jobs


def test_each_action_is_offered_with_its_own_permission(secret_cluster):
    # (The admin shows actions only above a list with rows.)
    HpcJob.objects.create(job_status=JobStatus.RUNNING, cluster=secret_cluster)
    pinner = _staff("pinner", "view_hpccluster", "pin_host_keys")
    html = pinner.get("/admin/djangoapp/hpccluster/").content.decode()
    assert 'value="pin_host_keys"' in html and 'value="connect_now"' not in html
    canceller = _staff("canceller", "view_hpcjob", "cancel_hpcjob")
    html = canceller.get("/admin/djangoapp/hpcjob/").content.decode()
    assert 'value="cancel_jobs"' in html and 'value="delete_job_data"' not in html
    changer = _staff("changer", "view_hpccluster", "change_hpccluster")
    html = changer.get("/admin/djangoapp/hpccluster/").content.decode()
    assert 'value="connect_now"' in html and 'value="pin_host_keys"' not in html
    admin_user = _staff("all", "view_hpcjob", "delete_hpcjob")
    html = admin_user.get("/admin/djangoapp/hpcjob/").content.decode()
    assert 'value="delete_job_data"' in html and 'value="cancel_jobs"' not in html


def test_a_view_only_user_posting_an_action_changes_nothing(viewer, secret_cluster):
    attacker_key = "evil.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAttacker"
    viewer.post("/admin/djangoapp/hpccluster/", {
        "action": "pin_host_keys", "_selected_action": [secret_cluster.pk], "confirm": "yes",
        f"key-{secret_cluster.pk}": attacker_key})
    secret_cluster.refresh_from_db()
    assert secret_cluster.host_key == ""
    job = HpcJob.objects.create(job_status=JobStatus.COMPLETED, cluster=secret_cluster)
    for action in ("delete_job_data", "cancel_jobs"):
        viewer.post("/admin/djangoapp/hpcjob/", {"action": action,
                                                 "_selected_action": [job.pk]})
        job.refresh_from_db()
        assert job.job_status == JobStatus.COMPLETED
    running = HpcJob.objects.create(job_status=JobStatus.PENDING, cluster=secret_cluster)
    viewer.post("/admin/djangoapp/hpcjob/", {"action": "cancel_jobs",
                                             "_selected_action": [running.pk]})
    running.refresh_from_db()
    assert running.job_status == JobStatus.PENDING


def test_the_pin_action_works_with_its_permission(secret_cluster):
    pinner = _staff("pinner", "view_hpccluster", "pin_host_keys")
    line = "hpc.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGood"
    pinner.post("/admin/djangoapp/hpccluster/", {
        "action": "pin_host_keys", "_selected_action": [secret_cluster.pk], "confirm": "yes",
        f"key-{secret_cluster.pk}": line})
    secret_cluster.refresh_from_db()
    assert secret_cluster.host_key == line + "\n"


# -- issue 9 item 15: a cluster's connection is "unknown" when hpcd does not answer ----

def test_the_cluster_list_says_unknown_when_hpcd_is_not_running(admin_client, settings,
                                                                 short_private_dir):
    settings.HPC_IPC_UNIX_SOCKET = os.path.join(short_private_dir, "nobody.sock")
    HpcCluster.objects.create(host_name="localhost", client_path="/srv/a")
    # hpcd last wrote "online", then was killed: the database cannot know.
    HpcCluster.objects.update(online=True)
    page = admin_client.get("/admin/djangoapp/hpccluster/").content.decode()
    assert "unknown (hpcd does not answer)" in page
    cluster = HpcCluster.objects.get()
    page = admin_client.get(f"/admin/djangoapp/hpccluster/{cluster.pk}/change/")
    assert "unknown (hpcd does not answer)" in page.content.decode()


def test_a_hung_hpcd_is_unknown_too(admin_client, settings, short_private_dir):
    # A socket that takes connections and never answers (a stopped hpcd).
    path = os.path.join(short_private_dir, "hung.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    settings.HPC_IPC_UNIX_SOCKET = path
    settings.HPC_IPC_NOTIFY_TIMEOUT = 0.2
    HpcCluster.objects.create(host_name="localhost", client_path="/srv/a", online=True)
    try:
        page = admin_client.get("/admin/djangoapp/hpccluster/").content.decode()
    finally:
        listener.close()
    assert "unknown (hpcd does not answer)" in page


def test_the_installation_id_is_shown_and_cannot_be_changed(admin_client):
    from djangoapp.models import HpcInstallation

    installation = HpcInstallation.current()
    page = admin_client.get("/admin/djangoapp/hpcinstallation/").content.decode()
    assert str(installation.installation_id) in page
    assert admin_client.get("/admin/djangoapp/hpcinstallation/add/").status_code == 403
    url = f"/admin/djangoapp/hpcinstallation/{installation.pk}/delete/"
    assert admin_client.post(url, {"post": "yes"}).status_code == 403
    assert HpcInstallation.current().installation_id == installation.installation_id
