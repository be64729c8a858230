"""Checks on the files an export is about to write, made before anything is read or written.

Both export commands (``qgait export``, ``qgait opengait export``) write an ONNX file and maybe a
packed file next to a checkpoint they read. A typo there must not cost a trained checkpoint or a
previous export, so: an output that is a folder, that is the checkpoint being read (or any other
input), or that is also the other output is refused, ``--force`` or not; an output that exists
is refused without ``--force``; an output that cannot be written (no permission, a file where a
folder should be) is refused too. The files themselves are written atomically
(:func:`~qgait_plugin.atomic.write_atomic`), and :func:`all_or_nothing` removes what a command wrote
when a later step of it fails, so a rerun needs no ``--force``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

from ..atomic import check_writable
from ..errors import QGaitError


class ExportPathError(QGaitError):
    """An export output path that would overwrite or clash with something."""


def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_paths(outputs: Dict[str, Optional[str]], inputs: Dict[str, Optional[str]], force: bool) -> None:
    """Refuse unsafe outputs. ``outputs``: option -> path (``None``/empty: not written); ``inputs``:
    what the export reads (label -> path), which no output may name."""
    given = {k: v for k, v in outputs.items() if v}
    for opt, path in given.items():
        if os.path.isdir(path):
            raise ExportPathError(f"{opt} {path}: is a folder; give a file name")
        for label, src in inputs.items():
            if src and _same(path, src):
                raise ExportPathError(f"{opt} {path}: is the {label} being read; refusing to overwrite it "
                                      "(even with --force)")
    opts = list(given)
    for i, a in enumerate(opts):
        for b in opts[i + 1:]:
            if _same(given[a], given[b]):
                raise ExportPathError(f"{a} and {b} name the same file {given[a]}; give two different files")
    if not force:
        for opt, path in given.items():
            if os.path.exists(path):
                raise ExportPathError(f"{opt} {path}: exists; pass --force to overwrite it")
    for opt, path in given.items():
        check_writable(path, opt)


def _stamp(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def all_or_nothing(paths: Sequence[Optional[str]]) -> Iterator[None]:
    """If the block fails, remove every file of ``paths`` it wrote (new, or replaced: inode, time or size
    changed); files it did not touch stay. A command's outputs are then all there or none is new."""
    given = [p for p in paths if p]
    before = {p: _stamp(p) for p in given}
    try:
        yield
    except BaseException:
        for p in given:
            now = _stamp(p)
            if now is not None and now != before[p]:
                with contextlib.suppress(OSError):
                    os.remove(p)
        raise
