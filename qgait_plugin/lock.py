"""One writer per output folder: a lock file holding the writer's pid.

Two commands writing into one folder at once (two trainings into one ``save_name``, two benchmarks
into one ``--out``) interleave their files, and each then reports the other's results as its own.
A check for existing outputs cannot stop that: both look before either has written. So every
command that writes a folder holds :func:`output_lock` on it for as long as it writes, and a second
writer is refused at once, with the holder's pid in the message.

The lock is ``flock`` on ``<folder>/.qgait-lock``, which holds the pid as text. The kernel drops the
lock when its process dies, however it dies, so a lock left by a killed process is taken over by the
next writer without a stale-pid guess. Within one process the lock is re-entrant (a demo's trainer
writes below the demo's folder; a benchmark trains its FP reference in several calls).
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Dict, Iterator, Tuple

from .atomic import output_error
from .errors import OutputBusy, OutputError

try:  # POSIX; elsewhere the lock is a no-op (the package is used on Linux)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

#: the lock file's name inside the folder it guards
LOCK_NAME = ".qgait-lock"

#: folder -> (open lock file, how many holders in this process)
_HELD: Dict[str, Tuple[int, int]] = {}


def lock_holder(folder: str) -> int:
    """The pid written in ``folder``'s lock file (0 when there is none or it cannot be read)."""
    try:
        with open(os.path.join(folder, LOCK_NAME)) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _acquire(folder: str, what: str) -> int:
    path = os.path.join(folder, LOCK_NAME)
    assert fcntl is not None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise output_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise output_error(path, e) from None
            pid = lock_holder(folder)
            who = f"process {pid}" if pid else "another process"
            raise OutputBusy(f"{what} {folder}: {who} is writing into it now (lock {path}); wait for it to finish "
                             "or stop it, or choose another folder") from None
        # the holder before us may have removed the file between our open and our lock: then we hold a lock
        # on a file nobody else can see, and must take the one that is there now
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(folder: str, what: str = "output folder") -> Iterator[None]:
    """Hold the lock on ``folder`` (created if missing) for the ``with`` block.

    Raises :class:`~qgait_plugin.errors.OutputBusy` naming the holder's pid when another live process
    holds it; ``what`` (e.g. ``"--out"``, ``"trainer_cfg.save_name"``) starts that message. A folder
    this call created and that is still empty afterwards (the lock file aside) is removed again, so
    a command that failed early leaves nothing behind.
    """
    key = os.path.realpath(folder)
    if fcntl is None:  # pragma: no cover
        yield
        return
    if key in _HELD:
        fd, count = _HELD[key]
        _HELD[key] = (fd, count + 1)
        try:
            yield
        finally:
            fd, count = _HELD[key]
            _HELD[key] = (fd, count - 1)
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{what} {folder}: is a file; expected a folder")
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise output_error(folder, e) from None
    fd = _acquire(folder, what)
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        del _HELD[key]
        path = os.path.join(folder, LOCK_NAME)
        with contextlib.suppress(OSError):
            os.remove(path)  # while still holding it: a waiting writer then sees another file and retries
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty
