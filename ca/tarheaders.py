"""The headers of a tar stream, walked before ``tarfile`` reads it.

``tarfile`` reads an extended header (pax ``x``/``g``, GNU ``L``/``K`` long names) into memory
in one ``read`` of the size that header declares, inside ``TarFile.open`` and ``next()``,
before a caller sees a member or its size: a 1 MB gzip holding one pax header that declares
1 GiB took 1.1 GB of memory and 20 s to refuse. An old GNU sparse member (``S``) or a pax
header's ``GNU.sparse.*`` records make it read a sparse map of any length, a list entry per few
bytes. None of them is in what ``trellis backup`` writes (Python's tarfile, pax format: one
small ``x`` header where a name is long or not ASCII, or a size over 8 GiB).

``walk`` reads the raw 512-byte headers in one pass, skipping member data in bounded chunks,
and refuses those before ``tarfile`` sees them: memory stays bounded whatever the headers say.
It mirrors where ``tarfile`` finds each next header; a header it cannot parse ends the walk, as
it ends ``tarfile``'s iteration (or is refused by it), so everything ``tarfile`` reads has been
walked first.
"""

from __future__ import annotations

import re
import tarfile
from typing import Protocol

from ca.errors import InvalidInput

__all__ = ["MAX_EXTENDED_BYTES", "walk"]

# A pax header for a name of 1,024 bytes and a size is about 1.1 KiB.
MAX_EXTENDED_BYTES = 64 * 2**10
_BLOCK = tarfile.BLOCKSIZE
_SKIP = 2**20  # member data is read past in chunks of this
_LOCAL = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)  # pax headers of the next member
_LONG_NAMES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # the one ``tarfile._proc_pax`` parses with


class _Stream(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _read(stream: _Stream, size: int) -> bytes:
    """Up to ``size`` bytes (fewer at the end), in reads of at most ``_SKIP``."""
    parts: list[bytes] = []
    while size > 0:
        part = stream.read(min(size, _SKIP))
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _skip(stream: _Stream, size: int) -> bool:
    """Read past ``size`` bytes; False at the end of the stream."""
    while size > 0:
        part = stream.read(min(size, _SKIP))
        if not part:
            return False
        size -= len(part)
    return True


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records ``tarfile`` takes from a pax header's data (it stops where one does not
    parse, and refuses one of length 0: so does this, leaving that refusal to it)."""
    records: dict[bytes, bytes] = {}
    position = 0
    while match := _RECORD.match(data, position):
        length = int(match.group(1))
        if length == 0:
            break
        records[match.group(2)] = data[match.end(2) + 1 : match.start(1) + length - 1]
        position += length
    return records


def walk(stream: _Stream, name: str, *, max_members: int, max_member_bytes: int) -> None:
    """Read the tar ``stream`` (decompressed) to its end, refusing (``InvalidInput`` naming
    the archive ``name``) a global pax header, an extended header over ``MAX_EXTENDED_BYTES``,
    two extended headers of a kind before one member, GNU sparse members and pax sparse
    records, more than ``max_members`` members, or one larger than ``max_member_bytes``. The
    exact limits per member are the caller's, checked on the headers ``tarfile`` then reads."""

    def refuse(reason: str) -> InvalidInput:
        return InvalidInput(f"{name}: {reason}: not a Trellis backup")

    members = 0
    pending: set[bytes] = set()  # the kinds of extended header read for the next member
    size_record: bytes | None = None  # its pax header's size, which replaces the header's
    while True:
        block = stream.read(_BLOCK)
        try:
            header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:  # the end, or what tarfile ends on or refuses
            return
        kind = header.type
        if kind == tarfile.XGLTYPE:
            raise refuse("it holds a global pax header")
        if kind == tarfile.GNUTYPE_SPARSE:
            raise refuse("it holds a GNU sparse member")
        if kind in (*_LOCAL, *_LONG_NAMES):
            if header.size > MAX_EXTENDED_BYTES:
                raise refuse(f"it holds a tar extended header of {header.size} bytes")
            family = tarfile.XHDTYPE if kind in _LOCAL else kind
            if family in pending:
                raise refuse("it holds two tar extended headers for one member")
            pending.add(family)
            data = _read(stream, _blocks(header.size))
            if family == tarfile.XHDTYPE:
                records = _pax_records(data[: header.size])
                if any(key.startswith(b"GNU.sparse.") for key in records):
                    raise refuse("it holds a sparse file")
                size_record = records.get(b"size")
            continue
        size = header.size
        if size_record is not None:
            try:
                size = int(size_record.decode("utf-8", "replace"))
            except ValueError:
                size = 0  # as tarfile takes it
        pending, size_record = set(), None
        members += 1
        if members > max_members:
            raise refuse(f"it has more than {max_members} members")
        if size < 0 or size > max_member_bytes:
            raise refuse(f"a member's header says it holds {size} bytes")
        if (header.isreg() or kind not in tarfile.SUPPORTED_TYPES) and not _skip(
            stream, _blocks(size)
        ):
            return
