"""Single-use connection tokens (WebsocketToken.objects.issue / claim)."""

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from djangoapp.models import HpcCluster, WebsocketToken, hash_token


@pytest.fixture
def cluster(db):
    return HpcCluster.objects.create(host_name="localhost", client_path="/agent")


def test_issue_stores_only_the_sha256_of_the_secret(cluster):
    row, secret = WebsocketToken.objects.issue(cluster.pk, "agent", ttl=60)
    assert len(secret) >= 32  # at least 128 bits, URL-safe base64
    stored = WebsocketToken.objects.get(pk=row.pk)
    assert stored.token_hash == hashlib.sha256(secret.encode()).hexdigest() == hash_token(secret)
    values = WebsocketToken.objects.filter(pk=row.pk).values().get()
    assert not any(secret in str(v) for v in values.values())


def test_every_token_is_different(cluster):
    secrets = {WebsocketToken.objects.issue(cluster.pk, "file", 60)[1] for _ in range(20)}
    assert len(secrets) == 20


def test_issue_sets_the_expiry_from_the_ttl(cluster):
    before = timezone.now()
    row, _ = WebsocketToken.objects.issue(cluster.pk, "agent", ttl=60)
    assert before + timedelta(seconds=60) <= row.expires <= timezone.now() + timedelta(seconds=60)
    row, _ = WebsocketToken.objects.issue(cluster.pk, "resume")
    assert row.expires is None


def test_a_token_is_claimed_once(cluster):
    row, secret = WebsocketToken.objects.issue(cluster.pk, "agent", ttl=60)
    claimed = WebsocketToken.objects.claim(secret, ["agent", "resume"])
    assert claimed.pk == row.pk and claimed.used_at is not None
    assert WebsocketToken.objects.get(pk=row.pk).used_at == claimed.used_at
    assert WebsocketToken.objects.claim(secret, ["agent", "resume"]) is None


def test_a_token_is_refused_for_another_purpose_and_not_spent(cluster):
    _, secret = WebsocketToken.objects.issue(cluster.pk, "file", ttl=60)
    assert WebsocketToken.objects.claim(secret, ["agent", "resume"]) is None
    assert WebsocketToken.objects.claim(secret, ["file"]) is not None


def test_an_expired_token_is_refused(cluster):
    row, secret = WebsocketToken.objects.issue(cluster.pk, "agent", ttl=60)
    WebsocketToken.objects.filter(pk=row.pk).update(
        expires=timezone.now() - timedelta(seconds=1))
    assert WebsocketToken.objects.claim(secret, ["agent"]) is None
    assert WebsocketToken.objects.get(pk=row.pk).used_at is None


def test_a_token_without_expiry_stays_valid_until_used(cluster):
    row, secret = WebsocketToken.objects.issue(cluster.pk, "resume")
    WebsocketToken.objects.filter(pk=row.pk).update(
        created=timezone.now() - timedelta(days=365))
    assert WebsocketToken.objects.claim(secret, ["resume"]).pk == row.pk


@pytest.mark.parametrize("secret", ["", "not-a-token", "x" * 1000, "é\u0000"])
def test_unknown_secrets_are_refused(cluster, secret):
    WebsocketToken.objects.issue(cluster.pk, "agent", ttl=60)
    assert WebsocketToken.objects.claim(secret, ["agent"]) is None


def test_the_stored_hash_itself_is_not_a_credential(cluster):
    row, _ = WebsocketToken.objects.issue(cluster.pk, "agent", ttl=60)
    assert WebsocketToken.objects.claim(row.token_hash, ["agent"]) is None


def test_a_token_presented_on_many_connections_at_once_is_claimed_once(transactional_db):
    import threading

    from django.db import connection, connections

    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip("threads do not share an in-memory SQLite database")
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/agent")
    for _ in range(5):
        _, secret = WebsocketToken.objects.issue(cluster.pk, "agent", ttl=60)
        barrier = threading.Barrier(4)
        claims = []

        def claim():
            try:
                barrier.wait(timeout=10)
                claims.append(WebsocketToken.objects.claim(secret, ["agent"]))
            finally:
                connections.close_all()

        threads = [threading.Thread(target=claim) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(claims) == 4
        assert sum(c is not None for c in claims) == 1
