"""Write a file so that readers see the old file or the whole new one, never half of it.

Checkpoints, packed models and ONNX exports all go through :func:`write_atomic`: the content is
written to a temporary name in the target's folder, flushed to disk and moved into place with
``os.replace``; on any error the temporary file is removed and the target is untouched.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def write_atomic(path: str, write: Callable[[str], None], sync: bool = True) -> None:
    """Call ``write(tmp_path)`` to produce the content, then move it to ``path`` in one step.

    ``sync=False`` skips the flush to disk (the move alone still keeps readers from half a file): for
    many small files that can be made again, such as a generated data set, where a flush per file
    costs more than the writing.
    """
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=out_dir)
    os.close(fd)
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
