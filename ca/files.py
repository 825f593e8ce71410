"""Writing files that other programs read, safely."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ca.errors import InvalidInput

__all__ = ["check_writable", "write_atomic", "write_private"]


def check_writable(path: Path, *, directory: bool, what: str | None = None) -> Path:
    """``path`` if it can be written (or created) as a file or, with ``directory``, as a
    directory the writers below put files in; ``InvalidInput`` naming ``what`` (the path itself
    by default) otherwise. Callers check before they issue or spend anything: a certificate
    whose key cannot be written, or a join token spent for it, is lost for good.

    The nearest existing directory is probed by creating (and removing) a temporary file there,
    as ``write_atomic`` will: permission bits do not tell root, nor a read-only or virtual file
    system such as ``/proc``, where ``os.access`` says yes and writing fails.
    """
    name = what or str(path)
    target = path.absolute()
    if not directory and (target.exists() or target.is_symlink()) and not target.is_file():
        # A device, a pipe, a socket, or a link to one (``/dev/null``, ``/dev/stdout``): the
        # file is written beside it and renamed over it, which would replace a system file
        # with a regular one holding what was written (a private key, say).
        raise InvalidInput(f"{name}: exists and is not a regular file")
    if directory and target.exists() and not target.is_dir():
        raise InvalidInput(f"{name}: exists and is not a directory")
    if not directory and target.is_dir():
        raise InvalidInput(f"{name}: is a directory, not a file")
    if target.exists() and not os.access(target, os.W_OK):
        raise InvalidInput(f"{name}: not writable")
    existing = target if directory else target.parent
    while not existing.exists() and not existing.is_symlink():  # created when written
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInput(f"{name}: cannot write under {existing}: not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".trellis-probe-")
    except OSError as exc:
        raise InvalidInput(f"{name}: cannot write under {existing}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` in one rename so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes) -> None:
    """Write key material: 0600 from the first byte (the temp file is created 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, mode=0o600)
