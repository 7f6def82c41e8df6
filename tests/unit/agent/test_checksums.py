"""The transfer end marker's checks (hpc_agent.checksums)."""

import hashlib
import zlib

import pytest

from hpc_agent import checksums


@pytest.mark.parametrize("kind, expected", [
    ("crc32", zlib.crc32(b"hello world")),
    ("sha256", hashlib.sha256(b"hello world").hexdigest()),
])
def test_a_checksum_fed_in_pieces_is_the_checksum_of_the_whole(kind, expected):
    check = checksums.new(kind)
    for piece in (b"hello", b" ", b"", b"world"):
        check.update(piece)
    assert (check.name, check.digest()) == (kind, expected)


def test_the_raw_bytes_are_the_digest_and_fit_the_trailer():
    crc, sha = checksums.new("crc32"), checksums.new("sha256")
    crc.update(b"x")
    sha.update(b"x")
    assert crc.raw() == zlib.crc32(b"x").to_bytes(4, "big")
    assert sha.raw() == hashlib.sha256(b"x").digest()


def test_the_agent_sends_crc32_and_a_header_without_a_kind_means_sha256():
    assert (checksums.DEFAULT, checksums.LEGACY) == ("crc32", "sha256")
    assert set(checksums.KINDS) == {"crc32", "sha256"}
    with pytest.raises(KeyError):
        checksums.new("md5")
