"""Credentials encrypted at rest: djangoapp.crypto, without a database.

Django is configured here only if nothing configured it before (no project
settings needed); the keys are set per test with override_settings, which
works the same under a project-wide pytest-django configuration.
"""

import pytest
from cryptography.fernet import Fernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from djangoapp.crypto import (
    CredentialDecryptError,
    CredentialKeyError,
    EncryptedTextField,
    decrypt,
    encrypt,
    generate_key,
    reveal,
    rotate,
)

OLD_KEY = Fernet.generate_key().decode()
NEW_KEY = Fernet.generate_key().decode()
SECRET = "s3cret pässword"

if not settings.configured:
    settings.configure()


@pytest.fixture(autouse=True)
def credential_keys():
    with override_settings(HPC_CREDENTIAL_KEYS=[OLD_KEY]):
        yield


def test_round_trip_and_ciphertext_form():
    token = encrypt(SECRET)
    assert token.startswith("fernet:")
    assert SECRET not in token
    assert decrypt(token) == SECRET


def test_each_encryption_differs():
    assert encrypt(SECRET) != encrypt(SECRET)


@pytest.mark.parametrize("empty", ["", None])
def test_empty_stays_empty(empty):
    assert encrypt(empty) == ""
    assert decrypt(empty) == ""
    assert rotate(empty) == ""


def test_first_key_encrypts_and_every_key_decrypts():
    old_token = encrypt(SECRET)
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW_KEY, OLD_KEY]):
        assert decrypt(old_token) == SECRET
        new_token = encrypt(SECRET)
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW_KEY]):
        assert decrypt(new_token) == SECRET


def test_rotate_reencrypts_under_the_first_key():
    old_token = encrypt(SECRET)
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW_KEY, OLD_KEY]):
        rotated = rotate(old_token)
    assert rotated.startswith("fernet:")
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW_KEY]):
        assert decrypt(rotated) == SECRET


def test_generate_key_makes_a_usable_key():
    key = generate_key()
    with override_settings(HPC_CREDENTIAL_KEYS=[key]):
        assert decrypt(encrypt(SECRET)) == SECRET


@pytest.mark.parametrize("configured", [None, [], (), OLD_KEY, {"key": OLD_KEY}, 42])
def test_missing_empty_or_non_list_setting_is_named(configured):
    with override_settings(HPC_CREDENTIAL_KEYS=configured):
        with pytest.raises(CredentialKeyError) as caught:
            encrypt(SECRET)
    assert "HPC_CREDENTIAL_KEYS" in str(caught.value)
    assert OLD_KEY not in str(caught.value)


def test_absent_setting_is_named():
    with override_settings():
        del settings.HPC_CREDENTIAL_KEYS
        with pytest.raises(CredentialKeyError) as caught:
            encrypt(SECRET)
    assert "HPC_CREDENTIAL_KEYS" in str(caught.value)


@pytest.mark.parametrize("malformed", ["short", "x" * 44, 1234, b"not base64 !!"])
def test_malformed_key_is_named_by_position_only(malformed):
    with override_settings(HPC_CREDENTIAL_KEYS=[OLD_KEY, malformed]):
        with pytest.raises(CredentialKeyError) as caught:
            encrypt(SECRET)
    message = str(caught.value)
    assert "HPC_CREDENTIAL_KEYS[1]" in message
    assert OLD_KEY not in message
    assert str(malformed) not in message


def test_key_errors_are_improperly_configured():
    assert issubclass(CredentialKeyError, ImproperlyConfigured)
    assert issubclass(CredentialDecryptError, CredentialKeyError)


def test_value_from_a_removed_key_says_so():
    token = encrypt(SECRET)
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW_KEY]):
        with pytest.raises(CredentialDecryptError) as caught:
            decrypt(token)
        with pytest.raises(CredentialDecryptError):
            rotate(token)
    message = str(caught.value)
    assert "HPC_CREDENTIAL_KEYS" in message
    assert "was the key removed?" in message
    assert SECRET not in message


@pytest.mark.parametrize("not_a_token", ["plain text", "fernet:garbage", "gAAAAAB"])
def test_decrypting_something_else_is_refused(not_a_token):
    with pytest.raises(CredentialDecryptError):
        decrypt(not_a_token)


def test_tampered_token_is_refused():
    token = encrypt(SECRET)
    tampered = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    with pytest.raises(CredentialDecryptError):
        decrypt(tampered)


# --- EncryptedTextField -----------------------------------------------------


@pytest.fixture
def field():
    field = EncryptedTextField(blank=True)
    field.set_attributes_from_name("password")
    return field


def test_field_stores_ciphertext_and_loads_it_undecrypted(field):
    stored = field.get_prep_value(SECRET)
    assert stored.startswith("fernet:")
    assert SECRET not in stored
    assert field.to_python(stored) == stored
    assert reveal(stored) == SECRET


def test_field_never_encrypts_twice(field):
    stored = field.get_prep_value(SECRET)
    assert field.get_prep_value(stored) == stored


def test_field_converts_non_text_like_a_textfield(field):
    assert field.to_python(42) == "42"
    assert decrypt(field.get_prep_value(42)) == "42"


def test_field_keeps_none_and_empty(field):
    assert field.get_prep_value(None) is None
    assert field.to_python(None) is None
    assert field.get_prep_value("") == ""
    assert field.to_python("") == ""


def test_field_reads_legacy_plaintext_as_is(field):
    """Rows written before encryption; they are encrypted at their next save."""
    assert field.to_python("legacy") == "legacy"
    assert reveal("legacy") == "legacy"
    assert field.get_prep_value("legacy").startswith("fernet:")


def test_field_serializes_ciphertext(field):
    class Row:
        password = SECRET

    serialized = field.value_to_string(Row())
    assert serialized.startswith("fernet:")
    assert reveal(field.to_python(serialized)) == SECRET


def test_a_changed_key_fails_only_on_reveal(field):
    stored = field.get_prep_value(SECRET)
    with override_settings(HPC_CREDENTIAL_KEYS=[NEW_KEY]):
        assert field.to_python(stored) == stored
        with pytest.raises(CredentialDecryptError):
            reveal(stored)


def test_field_deconstructs_to_its_module(field):
    name, path, args, kwargs = field.deconstruct()
    assert path == "djangoapp.crypto.EncryptedTextField"
    assert kwargs == {"blank": True}


def test_nothing_is_logged(caplog):
    with caplog.at_level("DEBUG"):
        decrypt(encrypt(SECRET))
        rotate(encrypt(SECRET))
    assert SECRET not in caplog.text
