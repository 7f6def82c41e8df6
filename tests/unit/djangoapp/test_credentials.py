"""Cluster credentials are decrypted on access only: a changed key breaks the
logins it must, never a listing of clusters or a job's cluster."""

import io

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings

from djangoapp.crypto import CredentialDecryptError, is_encrypted
from djangoapp.models import HpcCluster, HpcJob
from hpcd import store

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()


@pytest.fixture
def cluster(db):
    with override_settings(HPC_CREDENTIAL_KEYS=[OLD]):
        return HpcCluster.objects.create(host_name="hpc", client_path="/a", username="u",
                                         key="KEY", password="secret")


def test_rows_load_with_a_key_that_no_longer_fits(cluster):
    job = HpcJob.objects.create(cluster=cluster)
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW]):
        assert list(HpcCluster.objects.online()) == []
        assert HpcJob.objects.get(pk=job.pk).cluster.host_name == "hpc"
        assert store.clusters_thd()[0]["host_name"] == "hpc"
        with pytest.raises(CredentialDecryptError, match="HPC_CREDENTIAL_KEYS"):
            HpcCluster.objects.get(pk=cluster.pk).credentials()
        with pytest.raises(CredentialDecryptError):
            store.cluster_thd(cluster.pk)


def test_the_launcher_gets_the_plaintext(cluster):
    with override_settings(HPC_CREDENTIAL_KEYS=[OLD]):
        loaded = store.cluster_thd(cluster.pk)
    assert (loaded["key"], loaded["password"]) == ("KEY", "secret")
    assert is_encrypted(HpcCluster.objects.get(pk=cluster.pk).password)


def test_rotation_re_encrypts_tokens_and_encrypts_legacy_plaintext(cluster):
    legacy = HpcCluster.objects.create(host_name="old", client_path="/b")
    with connection.cursor() as cursor:  # a row written before encryption existed
        cursor.execute("UPDATE djangoapp_hpccluster SET password = %s WHERE id = %s",
                       ["plain", legacy.pk])
    assert HpcCluster.objects.get(pk=legacy.pk).password == "plain"
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW, OLD]):
        call_command("hpc_rotate_credentials", stdout=io.StringIO())
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW]):
        assert HpcCluster.objects.get(pk=cluster.pk).credentials() == {
            "key": "KEY", "password": "secret"}
        assert HpcCluster.objects.get(pk=legacy.pk).credentials()["password"] == "plain"
    assert is_encrypted(HpcCluster.objects.get(pk=legacy.pk).password)


def test_rotation_without_the_old_key_names_the_cluster_and_changes_nothing(cluster):
    before = HpcCluster.objects.get(pk=cluster.pk).password
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW]):
        with pytest.raises(CommandError, match=f"cluster {cluster.pk} .*was the key removed"):
            call_command("hpc_rotate_credentials", stdout=io.StringIO())
    assert HpcCluster.objects.get(pk=cluster.pk).password == before
