"""
Cluster credentials encrypted at rest (SSH private key, key passphrase,
password), with Fernet keys from the ``HPC_CREDENTIAL_KEYS`` setting.

``HPC_CREDENTIAL_KEYS`` is a list of Fernet keys (url-safe base64 of 32
bytes, see ``generate_key()``). The first key encrypts; every key decrypts.
To rotate: put a new key first, run ``rotate()`` over the stored values
(``manage.py hpc_rotate_credentials``), then drop the old key.

Values are decrypted on access only (``reveal()``), never on load: a
cluster row carries its ciphertext, so listing clusters or reading
``job.cluster`` works whatever the keys, and only the code that logs in
(hpcd's launcher) or rotates needs a key that fits.

Stored values carry the ``fernet:`` prefix, so ciphertext is never taken for
plaintext and never encrypted twice. The setting is read at every call, so
tests can override it. Nothing here logs or puts a plaintext in a message.
"""

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

SETTING = "HPC_CREDENTIAL_KEYS"
PREFIX = "fernet:"
# Every Fernet token starts with version byte 0x80, base64 "gAAAAA".
_TOKEN_START = PREFIX + "gAAAAA"


class CredentialKeyError(ImproperlyConfigured):
    """HPC_CREDENTIAL_KEYS is missing, empty or holds a malformed key."""


class CredentialDecryptError(CredentialKeyError):
    """A stored value cannot be decrypted with any configured key."""


def generate_key():
    """A new random Fernet key, for HPC_CREDENTIAL_KEYS."""
    return Fernet.generate_key().decode("ascii")


def is_encrypted(value):
    """Whether ``value`` is a token made by ``encrypt()``."""
    return isinstance(value, str) and value.startswith(_TOKEN_START)


def _fernet():
    configured = getattr(settings, SETTING, None)
    if not configured or not isinstance(configured, (list, tuple)):
        raise CredentialKeyError(
            f"{SETTING} must be a non-empty list of Fernet keys, e.g. "
            f"{SETTING} = [os.environ['HPC_CREDENTIAL_KEY']]; make a key with "
            f"djangoapp.crypto.generate_key()."
        )
    fernets = []
    for index, key in enumerate(configured):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError):
            # The key itself is a secret: name its position only.
            raise CredentialKeyError(
                f"{SETTING}[{index}] is not a valid Fernet key (url-safe base64 "
                f"of 32 bytes); make one with djangoapp.crypto.generate_key()."
            ) from None
    return MultiFernet(fernets)


def encrypt(text):
    """``fernet:<token>`` for ``text``; empty or None gives ""."""
    if not text:
        return ""
    return PREFIX + _fernet().encrypt(text.encode("utf-8")).decode("ascii")


def decrypt(token):
    """The plaintext of an ``encrypt()`` result; empty or None gives ""."""
    if not token:
        return ""
    return _fernet_call("decrypt", token).decode("utf-8")


def reveal(value):
    """The plaintext of a stored value: decrypted when it is a token, as is
    when it is plaintext not encrypted yet (a row from before encryption,
    or a value assigned and not saved); empty or None gives ""."""
    if not value:
        return ""
    return decrypt(value) if is_encrypted(value) else value


def rotate(token):
    """``token`` re-encrypted under the first key; empty or None gives ""."""
    if not token:
        return ""
    return PREFIX + _fernet_call("rotate", token).decode("ascii")


def _fernet_call(method, token):
    if not is_encrypted(token):
        raise CredentialDecryptError(
            f"a stored credential is not a '{PREFIX}' token, so it cannot be "
            f"decrypted; enter the credential again."
        )
    fernet = _fernet()
    try:
        return getattr(fernet, method)(token[len(PREFIX):].encode("ascii"))
    except InvalidToken:
        raise CredentialDecryptError(
            f"a stored credential cannot be decrypted with any key in {SETTING}: "
            f"was the key removed? Put the key that encrypted it back into "
            f"{SETTING}, or enter the credential again."
        ) from None


class EncryptedTextField(models.TextField):
    """A TextField whose column holds only ``fernet:`` ciphertext.

    The attribute holds what the column holds: ciphertext after a load,
    never decrypted on the way (``crypto.reveal()`` gives the plaintext).
    Assigning plaintext stores it encrypted at the next save; assigning a
    token stores that token as it is, never a token of a token.  Since every
    encryption differs, filtering on this field's value finds nothing.
    """

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if value is None or is_encrypted(value):
            return value
        return encrypt(value)

    def value_to_string(self, obj):
        # dumpdata: keep fixtures free of plaintext; loaddata keeps the token.
        return self.get_prep_value(self.value_from_object(obj))
