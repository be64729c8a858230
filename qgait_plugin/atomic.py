"""Write a file so that readers see the old file or the whole new one, never half of it.

Checkpoints, packed models and ONNX exports all go through :func:`write_atomic`: the content is
written to a temporary name in the target's folder, flushed to disk and moved into place with
``os.replace``; on any error the temporary file is removed and the target is untouched.

A process killed during a write (SIGKILL, power loss) cannot remove its temporary file. Its name
says whose it is (``.tmp-qgait-<pid>-<random><suffix>``), so the next write into that folder removes
such orphans: only files with exactly that form of name, whose process is gone and which are older
than the current process. A user's own file never has that name; another live writer's file is
never touched.

A write that fails for a reason the user can fix (a full disk, no permission, a read-only file
system) raises :class:`~qgait_plugin.errors.OutputError` naming the file and the reason, so every
command reports it as one line; the target keeps its earlier content. :func:`check_writable` makes
the same check before a command starts its work, so hours of training are not lost to a typo in an
output path.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
import time
from typing import Callable, Optional

from .errors import OutputError, QGaitError

#: every temporary file starts with this, then ``<pid>-``
TMP_PREFIX = ".tmp-qgait-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-[a-z0-9_]{8}(\.[A-Za-z0-9_]{1,16})?")
#: when this module was imported; a temporary file older than that cannot be one this process is writing
_STARTED = time.time()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell): leave its files alone
    return True


def remove_orphans(folder: str) -> int:
    """Remove temporary files that interrupted writes left in ``folder`` (see the module docstring);
    returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TMP_NAME.fullmatch(entry.name)
        if not m:
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= _STARTED:
                continue
            if _pid_alive(int(m.group(1))):
                continue
            os.remove(entry.path)
            removed += 1
        except OSError:  # gone already, or not ours to remove
            continue
    return removed


def write_atomic(path: str, write: Callable[[str], None], sync: bool = True, mode: Optional[int] = None) -> None:
    """Call ``write(tmp_path)`` to produce the content, then move it to ``path`` in one step.

    ``sync=False`` skips the flush to disk (the move alone still keeps readers from half a file): for
    many small files that can be made again, such as a generated data set, where a flush per file
    costs more than the writing. ``mode`` sets the file's permission bits (default: ``0o666`` less
    the umask, as a plain ``open`` would). Orphaned temporary files of killed writes in the target's
    folder are removed first (:func:`remove_orphans`).
    """
    out_dir = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(out_dir, exist_ok=True)
        remove_orphans(out_dir)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=os.path.splitext(path)[1],
                                   dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise output_error(path, e) from None
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except QGaitError:
        raise
    except OSError as e:
        raise output_error(path, e) from None
    except RuntimeError as e:
        # torch.save's own zip writer words a failed write as a RuntimeError ("file write failed")
        if "write" not in str(e).lower():
            raise
        raise output_error(path, OSError(errno.EIO, " ".join(str(e).split())[:200])) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def output_error(path: str, err: OSError) -> OutputError:
    """The one-line error for an output that could not be written: the file, and the system's reason."""
    reason = err.strerror or str(err)
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space and run again (earlier files are unchanged)"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose a folder you can write to"
    return OutputError(f"cannot write {path}: {reason}{hint}")


def write_text_atomic(path: str, text: str) -> None:
    """:func:`write_atomic` for a text file (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def check_writable(path: str, what: str) -> None:
    """Refuse, before any work starts, an output ``path`` (file or folder) that cannot be written.

    The nearest existing folder on the way to ``path`` must be a writable folder (the command creates
    the rest); ``what`` (e.g. ``"--out"``) starts the message. Nothing is created.
    """
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p) and not os.access(p, os.W_OK):
        raise OutputError(f"{what} {path}: is not writable; choose a file you can write to")
    d = p if os.path.isdir(p) else os.path.dirname(p)
    while not os.path.exists(d):
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if not os.path.isdir(d):
        raise OutputError(f"{what} {path}: {d} is a file, not a folder")
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot write into {d} (permission denied); choose a folder you can "
                          "write to")
