"""Writing files that other programs read, safely."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ca.errors import InvalidInput

__all__ = [
    "MAX_STORED_PATH",
    "OwnData",
    "check_writable",
    "data_directory",
    "held_temporary",
    "make_directory",
    "private_directory",
    "private_file",
    "remove_if_abandoned",
    "replacing",
    "replacing_together",
    "stored_path",
    "write_atomic",
    "write_private",
    "written_path",
]

log = logging.getLogger("trellis.files")

# The path columns: openvpn.crl_path and .server_dir, gateway_truststore.path,
# istio_cluster.output and .kubeconfig (tests/ca/test_stored_paths.py holds them to it).
MAX_STORED_PATH = 1024

_PUBLIC_PARENT = 0o755  # a missing parent: traversable, never writable by others (umask 000)
_SYSTEM_TREES = (Path("/proc"), Path("/dev"))  # what a link there leads to is no file of the user's
_SHM = Path("/dev") / "shm"  # a file system in /dev: files there are files
_MAX_LINKS = 40  # Linux's MAXSYMLINKS: a longer chain is a loop


@dataclass(frozen=True, slots=True)
class OwnData:
    """Trellis's own files and directories (``ca.config.DataPaths.own_data``), which no output a
    command is asked for may name: ``--out`` written over ``key-passphrase``, the database or
    ``admin-token``, or into ``keys/``, breaks the instance, and a key written there is lost
    to the next backup or restore. Other names in the data dir stay free (a backup archive
    kept there, say); the data dir itself is no output directory, as what a command writes
    into one (``bundle.pem``) would land beside, or on, Trellis's own."""

    data_dir: Path
    names: frozenset[str]  # the entries of the data dir that are Trellis's
    files: frozenset[Path] = frozenset()  # outside it: a SQLite database, its journals

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is, or is under, one of them; paths are compared resolved: a
        symlink or ``..`` leads to the same file."""
        target = _resolved(path)
        data_dir = _resolved(self.data_dir)
        if target == data_dir or target in {_resolved(file) for file in self.files}:
            return True
        if not target.is_relative_to(data_dir):
            return False
        return target.relative_to(data_dir).parts[0] in self.names


def check_writable(
    path: Path, *, directory: bool, what: str | None = None, own: OwnData | None = None
) -> Path:
    """``path`` if it can be written (or created) as a file or, with ``directory``, as a
    directory the writers below put files in; ``InvalidInput`` naming ``what`` (the path itself
    by default) otherwise. Callers check before they issue or spend anything: a certificate
    whose key cannot be written, or a join token spent for it, is lost for good. With ``own``,
    a path that is Trellis's own data (``OwnData``) is refused too: what a caller writes on
    request never goes there.

    A file that is a symlink is judged by the file it leads to, the one the writers below
    replace (``written_path``, which refuses a link through ``/proc`` or ``/dev``).

    The nearest existing directory is probed by creating (and removing) a temporary file there,
    as ``write_atomic`` will: permission bits do not tell root, nor a read-only or virtual file
    system such as ``/proc``, where ``os.access`` says yes and writing fails.
    """
    name = what or str(path)
    target = path.absolute()
    try:
        os.stat(target)
    except OSError as exc:  # missing, or under a file, is judged below
        if exc.errno == errno.ELOOP:  # a link loop on the way: no file to write
            raise InvalidInput(f"{name}: too many levels of symbolic links") from None
    if own is not None and own.holds(target):
        raise InvalidInput(
            f"{name}: is Trellis's own data (of the data dir {own.data_dir} or its database):"
            " choose another path"
        )
    if not directory:
        target = written_path(target, name)
    exists = target.exists() or target.is_symlink()
    if not directory and exists and not (target.is_file() or target.is_dir()):
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


def written_path(path: Path, what: str | None = None) -> Path:
    """The file a write to ``path`` replaces: ``path`` itself, or, if it is a symlink, the file
    its chain of links leads to (which need not exist yet), as ``openssl -out`` writes through
    a link. A file renamed over the link itself would turn it into a regular file: with
    ``--out /dev/stdout`` run as root and stdout a file, the system's ``/dev/stdout``, and the
    output never reaches the file stdout names. ``InvalidInput`` naming ``what`` for a chain
    that passes through ``/proc`` or ``/dev`` (``/dev/stdout``, ``/proc/self/fd/1``, a link to
    a device), whatever stdout is at the time; for one the kernel would not follow for us in a
    sticky world-writable directory such as ``/tmp`` (``fs.protected_symlinks``: a link owned
    by neither us nor the directory's owner, planted to make root write where its owner may
    not); and for a loop."""
    name = what or str(path)
    current = path.absolute()
    for _ in range(_MAX_LINKS + 1):
        parent = _resolved(current.parent)
        try:
            link = current.lstat()
        except OSError:  # missing, or under a file: the caller's checks say which
            link = None
        is_link = link is not None and stat.S_ISLNK(link.st_mode)
        # Not only links: a /dev/stdout that a broken write already made a regular file (or any
        # name in /dev or /proc) is no file of the user's either. /dev/shm is a file system.
        if _in_system_tree(current.parent, parent) and not _in_shm(current.parent, parent):
            raise InvalidInput(
                f"{name}: leads through {current}, a device or a process's file (stdout, say),"
                " not a file Trellis writes over"
            )
        if link is None or not is_link:
            return current
        held_by = parent.stat()
        if (
            held_by.st_mode & stat.S_ISVTX
            and held_by.st_mode & stat.S_IWOTH
            and link.st_uid not in (os.geteuid(), held_by.st_uid)
        ):
            raise InvalidInput(
                f"{name}: is a symlink owned by uid {link.st_uid} in {parent}, which anyone may"
                " write to: not followed (name the file it leads to)"
            )
        current = parent / os.readlink(current)  # an absolute link replaces what is before it
    raise InvalidInput(f"{name}: too many levels of symbolic links")


def _resolved(path: Path) -> Path:
    """``path`` resolved, or only made absolute where a link loop stops that: Python 3.11's
    ``resolve`` raises ``RuntimeError`` on one (a traceback for ``--out loop``), 3.13's
    ``OSError``; a loop leads to no file, so none of anyone's data."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.normpath(path.absolute()))


def _in_shm(*directories: Path) -> bool:
    return any(Path(os.path.normpath(d)).is_relative_to(_SHM) for d in directories)


def _in_system_tree(*directories: Path) -> bool:
    """Whether any of ``directories`` is, as written or resolved, under ``/proc`` or ``/dev``:
    ``/proc/self/cwd/x`` resolves out of ``/proc``, and is no file of the user's either."""
    spellings = {Path(os.path.normpath(d)) for d in directories}
    spellings |= {_resolved(d) for d in directories}
    return any(d.is_relative_to(tree) for d in spellings for tree in _SYSTEM_TREES)


def stored_path(path: Path, what: str) -> Path:
    """``path`` if its column can hold it. Checked here, before anything is issued or written:
    SQLite would keep a longer one, while PostgreSQL refuses the row (an internal error, after
    the work) instead of the caller's mistake."""
    if len(str(path)) > MAX_STORED_PATH:
        raise InvalidInput(
            f"{what} is at most {MAX_STORED_PATH} characters: {str(path)[:70]!r}... has "
            f"{len(str(path))}"
        )
    return path


def make_directory(path: Path, *, private: bool, exclusive: bool = False) -> list[Path]:
    """Create ``path`` if it is missing, and its missing parents, none of them writable by
    others whatever the umask (``mkdir -p`` under umask 000 makes them 0777: anyone could then
    move a directory away and put their own in its place). A private one is 0700 exactly: set
    again after ``mkdir``, which masks its mode. An existing ``path`` is left as it is. Returns
    the directories made, outermost first, for a caller that removes them again on failure."""
    made: list[Path] = []
    for parent in reversed(path.parents):
        if not parent.exists():
            with contextlib.suppress(FileExistsError):  # made meanwhile by another writer
                parent.mkdir(mode=_PUBLIC_PARENT)
                made.append(parent)
    try:
        path.mkdir(mode=0o700 if private else _PUBLIC_PARENT)
    except FileExistsError:
        if exclusive:
            raise
        return made
    if private:
        os.chmod(path, 0o700)
    return [*made, path]


def private_directory(path: Path, *, exclusive: bool = False) -> Path:
    """A directory for private keys that Trellis writes on request (an ``--out`` or ``--dir``):
    created 0700 if missing, whatever the umask; an existing one that its group or others may
    write to loses those bits (``_tighten``): whoever can write a directory can rename entries
    in it, swapping a key, or the ``..data`` symlink of the SVID files, for one of their own.
    Read bits stay: the keys are 0600, and the certificates beside them are often shared on
    purpose. With ``exclusive`` an existing one is an error (``FileExistsError``): a staging
    directory must be the one just made, not one planted."""
    make_directory(path, private=True, exclusive=exclusive)
    _tighten(path, stat.S_IWGRP | stat.S_IWOTH)
    return path


def data_directory(path: Path, *, create: bool = True) -> Path:
    """A directory of Trellis's own data that holds keys or secrets (the data dir, ``keys/``,
    ``secrets/``, ``server/``): created 0700 if missing (with ``create``), and an existing one
    that its group or others may use at all is tightened to 0700 (``_tighten``)."""
    if create:
        make_directory(path, private=True)
    _tighten(path, 0o077)
    return path


def private_file(path: Path, *, why: str = "it is a secret", writable: bool = False) -> Path:
    """A file of Trellis's own data that holds a secret (a CA key file, ``key-passphrase``, a
    sealed secret), before it is read: one its group or others may use at all is tightened to
    0600 (``_tighten``, whose warning gives ``why``). Trellis writes them 0600; a looser one was
    put there by hand (``cp`` without ``-p``, an archive unpacked under a loose umask). Its
    directory is 0700 and keeps others out, until it is copied somewhere with its mode.

    ``writable``: a file Trellis writes as it runs (the SQLite database and its journals) is
    made 0600 exactly, its owner's read and write given back too: a database left 0400 was
    opened read-only, and SQLite made its ``-shm`` 0400 with it, after which every write failed
    ("attempt to write a readonly database") until someone found that file and chmodded it."""
    _tighten(path, 0o077, directory=False, why=why, needed=0o600 if writable else 0)
    return path


def _tighten(
    path: Path, loose: int, *, directory: bool = True, why: str | None = None, needed: int = 0
) -> None:
    """Clear the ``loose`` bits of an existing directory (or, not ``directory``, a regular
    file), and set the ``needed`` ones (the owner's, alone), with a warning naming its old
    mode, if this user owns it. It is tightened rather
    than refused: that ``chmod`` is what the operator would be told to run, and Trellis made
    most such directories itself (an older version made them with the umask's mode). One owned
    by another user cannot be changed here and is used with a warning: a Kubernetes emptyDir
    shared by the agent and the workload is root's and 0777 (2777 with ``fsGroup``), and
    refusing it would stop every such pod."""
    try:
        status = path.stat()
    except OSError:  # missing (or under a file): whoever writes there reports what is wrong
        return
    mode = stat.S_IMODE(status.st_mode)
    why = why or ("it holds private keys" if directory else "it is a secret")
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    if not kind(status.st_mode) or not (mode & loose or needed & ~mode):
        return
    if status.st_uid == os.geteuid():
        os.chmod(path, (mode & ~loose) | needed)
        log.warning(
            "%s was mode %04o: %s to %04o (%s)",
            path,
            mode,
            "tightened" if mode & loose else "set",
            (mode & ~loose) | needed,
            why,
        )
    else:
        log.warning(
            "%s is mode %04o and owned by uid %d, not this user (%d): Trellis cannot tighten it"
            " and uses it as it is; %s, so its owner should run 'chmod %s %s'",
            path,
            mode,
            status.st_uid,
            os.geteuid(),
            why,
            ("0700" if directory else "0600") if loose == 0o077 or needed else "go-w",
            path,
        )


@contextlib.contextmanager
def replacing(path: Path, mode: int = 0o644, *, private: bool = False) -> Iterator[BinaryIO]:
    """A file to write that replaces ``path`` in one rename when the block ends, so a reader
    never sees a half-written file; if the block raises, the file is removed and ``path`` is
    left as it was. It is a temporary file beside ``path`` (the rename stays on one file
    system), created 0600 and set to ``mode`` before the first byte, flushed to disk before the
    rename. With ``private``, a missing directory for it is made 0700. Callers stream into it:
    a backup of a database of gigabytes is never held in memory. A symlink at ``path`` stays:
    the file it leads to is replaced (``written_path``)."""
    path = written_path(path)
    make_directory(path.parent, private=private)
    fd, tmp = held_temporary(path.parent, f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, path)  # before the flock goes with the descriptor
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def held_temporary(directory: Path, prefix: str) -> tuple[int, Path]:
    """A new file (``mkstemp``: 0600, ``prefix`` and 8 random characters) with an exclusive
    ``flock`` on its descriptor, held until that is closed: a writer killed with SIGKILL runs no
    clean-up, and its temporary file (a backup's: as large as the database) stays; the lock
    tells the next one's clean-up (``remove_if_abandoned``) a file whose writer is gone, whose
    lock the kernel dropped, from one still being written. A clean-up that took the file
    between ``mkstemp`` and the lock has removed it: then another is made."""
    while True:
        fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no flock here (some network file systems): nor can a clean-up
                return fd, Path(name)
            if _still_named(fd, Path(name)):
                return fd, Path(name)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _still_named(fd: int, path: Path) -> bool:
    try:
        named = path.stat(follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def remove_if_abandoned(path: Path) -> bool:
    """Remove ``path``, a temporary file of ``held_temporary``'s, if no process holds its
    lock (its writer died); whether it did. Not a regular file, one that cannot be opened or
    locked (a file system without ``flock``), or one held: left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _still_named(fd, path):
            return False
        path.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing_together(files: Mapping[Path, tuple[bytes, int]]) -> Iterator[None]:
    """Replace several files that only work together (a key and its certificate) all or none:
    each ``path: (data, mode)`` is staged beside its target (as ``replacing`` does, flushed to
    disk; a private mode makes a missing directory 0700), then the targets are replaced, in
    order, and the block runs: it is where a caller records what it delivered. If staging, a
    rename or the block fails, Ctrl-C included, the staged files are removed and every target
    already replaced gets its previous content back (or is removed, if it had none): a new key
    beside the old certificate is a server that no longer starts, and a key written without
    its certificate is a key lost. A symlink among them stays: the file it leads to is
    replaced (``written_path``)."""
    files = {written_path(path): content for path, content in files.items()}
    staged: dict[Path, Path] = {}
    kept: dict[Path, Path] = {}  # target: a link to what it held before
    try:
        for path, (data, mode) in files.items():
            make_directory(path.parent, private=not mode & 0o077)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            staged[path] = Path(name)
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for path in staged:
            if path.is_file():
                kept[path] = _kept_copy(path)
        for path, tmp in staged.items():
            os.replace(tmp, path)
        yield
    except BaseException:
        # Decided by what is on disk, not by how far the loop got: an interrupt may land just
        # after a rename. A staged file that is gone was renamed over its target.
        for path, tmp in staged.items():
            if tmp.exists():
                tmp.unlink()
            elif path in kept:
                os.replace(kept.pop(path), path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for previous in kept.values():
            previous.unlink(missing_ok=True)


def _kept_copy(path: Path) -> Path:
    """A second name for ``path``'s current content, to put back if a later rename fails: a
    hard link, or a copy (mode included) where the file system has none."""
    keep = path.with_name(f".{path.name}.previous.{secrets.token_hex(4)}")
    try:
        os.link(path, keep)
    except OSError:
        shutil.copy2(path, keep)
    return keep


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` in one rename so a reader never sees a half-written file."""
    with replacing(path, mode) as handle:
        handle.write(data)


def write_private(path: Path, data: bytes) -> None:
    """Write key material: 0600 from the first byte (the temp file is created 0600), in a
    directory created 0700 if it is missing."""
    with replacing(path, 0o600, private=True) as handle:
        handle.write(data)
