"""The admin shows a cluster's connection as hpcd knows it (issue 9 item 15),
with the real hpcd and a real agent."""

from django.contrib.auth.models import User
from django.test import Client

from djangoapp.models import HpcCluster


def test_online_while_hpcd_answers_unknown_once_it_stopped(local_cluster, hpcd):
    User.objects.create_superuser("admin", "admin@example.org", "pw")
    client = Client()
    client.login(username="admin", password="pw")
    page = client.get("/admin/djangoapp/hpccluster/").content.decode()
    assert ">online<" in page and "unknown" not in page
    page = client.get(f"/admin/djangoapp/hpccluster/{local_cluster.pk}/change/").content.decode()
    assert ">online<" in page
    hpcd.stop()
    # A clean stop clears the stored flag; the page says it cannot know.
    assert not HpcCluster.objects.get(pk=local_cluster.pk).online
    page = client.get("/admin/djangoapp/hpccluster/").content.decode()
    assert "unknown (hpcd does not answer)" in page
