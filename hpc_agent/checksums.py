"""The integrity checks a file transfer's end marker carries.

A transfer's end marker (``file_end``) says how many bytes were sent and a
checksum of them, so the receiver can tell a complete file from one damaged
or cut off on the way.  That is a transport check, not a proof of content:
CRC-32 (``zlib.crc32``) catches what goes wrong on a connection and costs a
fraction of SHA-256, which capped downloads at a fifth of a plain socket
copy.  The agent names the kind in its ``file_header``; a header that names
none is from an agent that predates this and sends SHA-256 (``LEGACY``).  A
portal that wants a cryptographic digest of a file asks for it:
``HpcJob.file_checksum(path)``, SHA-256 computed by the agent.
"""

import hashlib
import zlib


class Crc32:
    """CRC-32 of the bytes; on the wire an integer (``file_end``'s ``crc32``)."""

    name = "crc32"

    def __init__(self):
        self._value = 0

    def update(self, data):
        self._value = zlib.crc32(data, self._value)

    def digest(self):
        """The value the end marker carries."""
        return self._value

    def raw(self):
        return self._value.to_bytes(4, "big")


class Sha256:
    """SHA-256 of the bytes; on the wire hexadecimal (``file_end``'s ``sha256``)."""

    name = "sha256"

    def __init__(self):
        self._hash = hashlib.sha256()

    def update(self, data):
        self._hash.update(data)

    def digest(self):
        """The value the end marker carries."""
        return self._hash.hexdigest()

    def raw(self):
        return self._hash.digest()


#: Kind name (the ``file_header``'s ``checksum`` and the ``file_end`` field
#: carrying the value) -> class.
KINDS = {cls.name: cls for cls in (Crc32, Sha256)}
#: What the agent sends.
DEFAULT = Crc32.name
#: What a header without ``checksum`` means (agents from before it).
LEGACY = Sha256.name


def new(kind=DEFAULT):
    """A fresh checksum of ``kind``; KeyError for a kind not in KINDS."""
    return KINDS[kind]()
