"""hpcd's database functions (called directly here, off any reactor)."""

from datetime import timedelta

from django.utils import timezone

from djangoapp.models import HpcCluster, WebsocketToken
from hpcd import store


def test_old_tokens_are_purged_except_live_and_latest_resume_ones(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    spent, _ = WebsocketToken.objects.issue(cluster.pk, "file", 60)
    live, _ = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    resume, _ = WebsocketToken.objects.issue(cluster.pk, "resume")
    fresh, _ = WebsocketToken.objects.issue(cluster.pk, "file", 60)
    WebsocketToken.objects.filter(pk__in=[spent.pk, live.pk, resume.pk]).update(
        created=timezone.now() - timedelta(days=2))
    assert store.purge_tokens_thd([live.pk]) == 1
    assert set(WebsocketToken.objects.values_list("pk", flat=True)) == {
        live.pk, resume.pk, fresh.pk}


def test_a_new_resume_token_revokes_the_older_ones(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    _, first = store.issue_token_thd(cluster.pk, "resume", None)
    _, second = store.issue_token_thd(cluster.pk, "resume", None)
    assert store.claim_token_thd(first, ["resume"]) is None
    assert store.claim_token_thd(second, ["resume"])["cluster_id"] == cluster.pk
    assert store.claim_token_thd(second, ["resume"]) is None  # single use


def test_clusters_are_listed_without_their_credentials(db):
    HpcCluster.objects.create(host_name="h", client_path="/x", username="u",
                              password="secret")
    (listed,) = store.clusters_thd()
    assert "password" not in listed and "key" not in listed
