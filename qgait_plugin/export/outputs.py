"""Checks on the files an export is about to write, made before anything is read or written.

Both export commands (``qgait export``, ``qgait opengait export``) write an ONNX file and maybe a
packed file next to a checkpoint they read. A typo there must not cost a trained checkpoint or a
previous export, so: an output that is a folder, that is the checkpoint being read (or any other
input), or that is also the other output is refused, ``--force`` or not; an output that exists
is refused without ``--force``. The files themselves are written atomically
(:func:`~qgait_plugin.atomic.write_atomic`).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

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
