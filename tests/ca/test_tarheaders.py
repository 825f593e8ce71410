"""``ca.tarheaders.walk``: it finds every header ``tarfile`` finds (pax long names and sizes
included), and refuses the headers ``tarfile`` would read whole into memory, reading no more
than a small bound at a time. tests/cli/test_backup_processes.py restores such archives as a
real process and measures its memory."""

from __future__ import annotations

import io
import tarfile

import pytest

from ca.errors import InvalidInput
from ca.tarheaders import MAX_EXTENDED_BYTES, walk

GiB = 2**30


class _Bounded(io.BytesIO):
    """A stream that fails a test reading more than 1 MiB at once, and endless zeros past
    what it holds: a header that declared gigabytes would be read for real."""

    def read(self, size: int | None = -1, /) -> bytes:
        assert size is not None and 0 <= size <= 2**20, size
        data = super().read(size)
        return data + b"\0" * (size - len(data))


def _header(kind: bytes, size: int, name: str = "././@PaxHeader") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _pax(records: dict[str, str]) -> bytes:
    """A pax ``x`` header and its data (``tarfile`` writes these for long names)."""
    data = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        length = len(body) + len(str(len(body)))
        length += len(str(length)) - len(str(len(body)))
        data += str(length).encode() + body
    padded = data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return _header(tarfile.XHDTYPE, len(data)) + padded


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _walk(data: bytes, *, max_members: int = 100, max_member_bytes: int = GiB) -> None:
    walk(_Bounded(data), "b.tgz", max_members=max_members, max_member_bytes=max_member_bytes)


def test_it_counts_every_member_tarfile_finds_behind_pax_headers() -> None:
    """Long and non-ASCII names make pax headers (Python's default format); a member after
    one is found where tarfile finds it, or the count would be off."""
    members = {
        "keys/" + "a" * 300: b"x" * 1000,
        "bundle.pem": b"y" * 513,
        "keys/é.pem": b"",
        "keys/" + "b" * 150: b"z" * 70_000,
        "manifest.json": b"{}",
    }
    data = _tar(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert archive.getnames() == list(members)
    _walk(data, max_members=5)
    with pytest.raises(InvalidInput, match="more than 4 members"):
        _walk(data, max_members=4)


def test_a_pax_size_record_replaces_the_header_s() -> None:
    """A member's size over 8 GiB is written in a pax ``size`` record: the header's field is
    then not where the next header is."""
    data = _pax({"size": "1024"}) + _header(tarfile.REGTYPE, 0, "trellis.db") + b"d" * 1024
    data += _header(tarfile.REGTYPE, 3, "bundle.pem") + b"pem".ljust(512, b"\0")
    _walk(data, max_members=2)
    with pytest.raises(InvalidInput, match="more than 1 members"):
        _walk(data, max_members=1)
    with pytest.raises(InvalidInput, match="holds 1024 bytes"):
        _walk(data, max_member_bytes=1000)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(_header(tarfile.XHDTYPE, GiB), "extended header of", id="pax-x/1GiB"),
        pytest.param(_header(tarfile.XGLTYPE, GiB), "global pax header", id="pax-g/1GiB"),
        pytest.param(_header(tarfile.XGLTYPE, 20), "global pax header", id="pax-g/small"),
        pytest.param(
            _header(tarfile.GNUTYPE_LONGNAME, 256 * 2**20, "././@LongLink"),
            "extended header of",
            id="gnu-L/256MiB",
        ),
        pytest.param(
            _header(tarfile.GNUTYPE_LONGLINK, GiB, "././@LongLink"),
            "extended header of",
            id="gnu-K/1GiB",
        ),
        pytest.param(
            _header(tarfile.XHDTYPE, MAX_EXTENDED_BYTES + 1),
            "extended header of",
            id="pax-x/just-over",
        ),
        pytest.param(
            _header(tarfile.GNUTYPE_SPARSE, 10, "trellis.db"), "GNU sparse", id="gnu-sparse"
        ),
        pytest.param(
            _pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})
            + _header(tarfile.REGTYPE, 512, "trellis.db"),
            "sparse file",
            id="pax-sparse-1.0",
        ),
        pytest.param(
            _pax({"path": "a"}) + _pax({"path": "b"}) + _header(tarfile.REGTYPE, 0, "x"),
            "two tar extended headers",
            id="pax-chain",
        ),
        pytest.param(
            _header(tarfile.REGTYPE, 2 * GiB, "trellis.db"), "holds 2147483648 bytes", id="size"
        ),
    ],
)
def test_a_header_tarfile_would_read_whole_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as refused:
        _walk(data)
    assert str(refused.value.detail).startswith("b.tgz: ")
    assert str(refused.value.detail).endswith(": not a Trellis backup")


def test_a_stream_that_ends_part_way_ends_the_walk() -> None:
    """What comes after is tarfile's to refuse (the restore then says it is unreadable)."""
    walk(io.BytesIO(_tar({"a": b"x" * 5000})[:1500]), "b.tgz", max_members=1,
         max_member_bytes=GiB)  # fmt: skip
    walk(io.BytesIO(b"not a tar at all"), "b.tgz", max_members=1, max_member_bytes=GiB)
