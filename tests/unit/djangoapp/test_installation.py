"""The installation's identity (issue 9 item 13): one UUID, made once."""

import uuid

from djangoapp.models import HpcInstallation


def test_the_migration_made_the_installation_and_it_stays_the_same(db):
    assert HpcInstallation.objects.count() == 1
    first = HpcInstallation.current().installation_id
    assert isinstance(first, uuid.UUID)
    assert HpcInstallation.current().installation_id == first
    assert HpcInstallation.objects.count() == 1


def test_a_missing_row_is_made_on_first_use(db):
    old = HpcInstallation.current().installation_id
    HpcInstallation.objects.all().delete()
    made = HpcInstallation.current().installation_id
    assert made != old and HpcInstallation.current().installation_id == made
    assert HpcInstallation.objects.count() == 1


def test_hpcd_reads_the_id_it_sends_in_welcome(db):
    from hpcd import store

    assert store.installation_id_thd() == str(HpcInstallation.current().installation_id)
