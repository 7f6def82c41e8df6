"""hpcd's records of clusters and their resume tokens (hpcd.store)."""

from datetime import timedelta

from django.utils import timezone

from djangoapp.models import HpcCluster, WebsocketToken
from hpcd import store


def _resume_token(cluster):
    row, secret = WebsocketToken.objects.issue(cluster.pk, "resume")
    return row, secret


def test_a_live_connections_resume_token_has_no_expiry_until_it_is_lost(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    other = HpcCluster.objects.create(host_name="localhost", client_path="/y")
    row, secret = _resume_token(cluster)
    other_row, _ = _resume_token(other)
    store.set_cluster_state_thd(cluster.pk, True, "connected")
    row.refresh_from_db()
    assert row.expires is None
    store.set_cluster_state_thd(cluster.pk, False, "lost", resume_ttl=60)
    row.refresh_from_db()
    other_row.refresh_from_db()
    assert timezone.now() < row.expires <= timezone.now() + timedelta(seconds=60)
    assert other_row.expires is None  # another cluster's connection is unaffected
    assert store.claim_token_thd(secret, ["resume"]) is not None  # still usable meanwhile


def test_an_armed_resume_token_stops_working_when_it_expires(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    row, secret = _resume_token(cluster)
    store.set_cluster_state_thd(cluster.pk, False, "lost", resume_ttl=60)
    WebsocketToken.objects.filter(pk=row.pk).update(expires=timezone.now() - timedelta(1))
    assert store.check_token_thd(secret, ["resume"]) is None
    assert store.claim_token_thd(secret, ["resume"]) is None


def test_marking_all_offline_arms_every_resume_token(db):
    clusters = [HpcCluster.objects.create(host_name="localhost", client_path=f"/{i}")
                for i in range(2)]
    rows = [_resume_token(c)[0] for c in clusters]
    HpcCluster.objects.update(online=True, connected_since=timezone.now())
    store.mark_all_offline_thd(60)
    assert not HpcCluster.objects.filter(online=True).exists()
    assert all(r.expires is not None for r in WebsocketToken.objects.filter(
        pk__in=[r.pk for r in rows]))


def test_checking_a_token_does_not_spend_it(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    _, secret = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    assert store.check_token_thd(secret, ["agent"])["cluster_id"] == cluster.pk
    assert store.check_token_thd(secret, ["agent"]) is not None
    assert store.check_token_thd(secret, ["file"]) is None  # wrong purpose
    assert store.claim_token_thd(secret, ["agent"]) is not None
    assert store.check_token_thd(secret, ["agent"]) is None  # spent
