"""The committed migrations match the models."""

import io

from django.core.management import call_command


import pytest


@pytest.mark.parametrize("app", ["djangoapp", "testjobs", "seedportal"])
def test_makemigrations_finds_nothing_to_do(db, app):
    out = io.StringIO()
    call_command("makemigrations", app, "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
