"""The committed migrations match the models."""

import io

from django.core.management import call_command


def test_makemigrations_finds_nothing_to_do(db):
    out = io.StringIO()
    call_command("makemigrations", "djangoapp", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
