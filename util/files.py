"""Writing files so that nothing a user had is lost: the one atomic writer.

    from util.files import atomic_file, atomic_write
    with atomic_file("out.txt", "w") as f:      # text or binary ("wb")
        f.write("...")
    atomic_write("data.bin", lambda f: f.write(b"..."))

A regular file (or a new path) is written under a temporary name in the same
directory, flushed to disk and renamed over the target only when everything
was written: a failure or an interruption leaves the old file (or nothing)
and no temporary file.  A symbolic link is followed: its target is replaced
the same way, in the target's directory, and the link stays a link.  A path
that is not a regular file -- a character device such as /dev/null or
/dev/stdout, a FIFO, a socket -- is never replaced: it is written directly.

The temporary files being written are tracked, so that a signal handler can
remove them before the process ends (``remove_temporary_files``).  Errors are
plain ``OSError``s; callers turn them into their own one-line messages.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Set

_PENDING: Set[str] = set()


def remove_temporary_files() -> None:
    """Remove every temporary file an unfinished atomic write holds (for signal handlers)."""
    for path in list(_PENDING):
        with contextlib.suppress(OSError):
            os.unlink(path)
        _PENDING.discard(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def target_of(path: str | os.PathLike) -> Path:
    """Where writing ``path`` really goes: a symlink's final target, else the path itself."""
    p = Path(os.path.abspath(path))
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def is_special(path: str | os.PathLike) -> bool:
    """True for an existing path that is not a regular file (a device, FIFO or socket)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def check_writable(path: str | os.PathLike) -> None:
    """Raise OSError now when ``path`` cannot be written (its directory missing, a
    directory in its place, no permission) -- before any long computation."""
    target = target_of(path)
    if target.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    if is_special(target):
        return
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(2, f"no such directory {directory}", str(path))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(directory))


def open_regular(path: str | os.PathLike):
    """A binary file object for the regular file ``path``, never through a symbolic link at its
    name (O_NOFOLLOW) and never blocking on a FIFO; None for anything else."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")
    except OSError:
        os.close(fd)
        return None


#: The largest record file ``read_record`` reads (records are a few hundred bytes).
MAX_RECORD = 1 << 16


def read_small(path: str | os.PathLike, limit: int) -> Optional[bytes]:
    """The bytes of the regular file ``path`` (opened as ``open_regular`` opens: never through a
    link at its name, never a FIFO), or None when it is missing, not a regular file, unreadable
    or larger than ``limit`` bytes."""
    f = open_regular(path)
    if f is None:
        return None
    try:
        with f:
            raw = f.read(limit + 1)
    except OSError:
        return None
    return raw if len(raw) <= limit else None


def read_record(path: str | os.PathLike) -> Optional[Any]:
    """The JSON value in the small record file ``path`` (see ``read_small``), or None when there is
    none: missing, not a regular file, larger than ``MAX_RECORD`` bytes, unreadable or not JSON."""
    raw = read_small(path, MAX_RECORD)
    try:
        return None if raw is None else json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return None


def write_record(path: str | os.PathLike, value: Any) -> bool:
    """``value`` as JSON in ``path`` (its directory made), atomically, replacing whatever is at the
    name -- a link is never followed; False when it cannot be written."""
    text = json.dumps(value, sort_keys=True)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(text.encode()), follow_symlinks=False)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8",
                follow_symlinks: bool = True) -> Iterator:
    """A file object for ``path`` (mode "w" or "wb"), committed when the block ends normally.
    ``follow_symlinks`` False (caches in shared directories): whatever is at ``path`` -- a symbolic
    link, a device, a FIFO -- is replaced by the new regular file, and never opened."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    text = "b" not in mode
    target = target_of(path) if follow_symlinks else Path(os.path.abspath(path))
    if follow_symlinks and is_special(target):
        with open(target, mode, encoding="utf-8" if text else None) as f:
            yield f
        return
    try:
        st = os.stat(target, follow_symlinks=follow_symlinks)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        keep_mode = stat.S_IMODE(st.st_mode)
    except OSError:
        keep_mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    _PENDING.add(tmp)
    try:
        with os.fdopen(fd, mode, encoding=encoding if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, keep_mode)
        os.replace(tmp, target)
        _PENDING.discard(tmp)
        fsync_directory(target.parent)
    finally:
        if tmp in _PENDING:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            _PENDING.discard(tmp)


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "wb", follow_symlinks: bool = True) -> None:
    """``write(file)`` into ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, mode, follow_symlinks=follow_symlinks) as f:
        write(f)


def fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
