"""Write a file so that readers see the old file or the whole new one, never half of it.

Checkpoints, packed models and ONNX exports all go through :func:`write_atomic`: the content is
written to a temporary name in the target's folder, flushed to disk and moved into place with
``os.replace``; on any error the temporary file is removed and the target is untouched.

A process killed during a write (SIGKILL, power loss) cannot remove its temporary file. Its name
says whose it is (``.tmp-qgait-<pid>-<random><suffix>``), so the next write into that folder removes
such orphans: only files with exactly that form of name, whose process is gone and which are older
than the current process. A user's own file never has that name; another live writer's file is
never touched.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from typing import Callable, Optional

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
    os.makedirs(out_dir, exist_ok=True)
    remove_orphans(out_dir)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=os.path.splitext(path)[1], dir=out_dir)
    os.close(fd)
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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
