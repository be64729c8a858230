"""``qgait patch apply|revert|status``: the smallest change that makes OpenGait's own scripts load the plugin.

A patch is our own instruction in ``patches/*.json`` (file, structural anchor, one line to insert),
never a diff with OpenGait context. ``apply`` is idempotent (the line is recognised by its text),
``revert`` removes exactly the inserted line, so the file is restored byte for byte, and
``status`` says what is applied. Line endings of the target file are kept.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

from ..errors import QGaitError

#: the project's top-level ``patches/`` (the README's install is editable, so it sits beside the package)
PATCH_DIR = Path(__file__).resolve().parents[2] / "patches"
_IMPORT = re.compile(r"^(import|from)\s+\S")


class PatchError(QGaitError):
    """A patch cannot be applied or reverted on this checkout."""


@dataclass(frozen=True)
class Patch:
    name: str
    file: str
    anchor: str
    insert: str

    @classmethod
    def load(cls, path: Path) -> Patch:
        d = json.loads(path.read_text())
        for key in ("file", "anchor", "insert"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise PatchError(f"{path}: key {key!r} missing or not a non-empty string")
        if d["anchor"] != "after_leading_imports":
            raise PatchError(f"{path}: anchor {d['anchor']!r} unknown; supported: 'after_leading_imports'")
        return cls(path.stem, d["file"], d["anchor"], d["insert"])


def load_patches() -> List[Patch]:
    found = sorted(PATCH_DIR.glob("*.json"))
    if not found:
        raise PatchError(f"no patch instructions in {PATCH_DIR}: run from a source checkout installed with "
                         "`pip install -e .` (patches/ lives at the repository's top level)")
    return [Patch.load(p) for p in found]


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _anchor_index(lines: List[str], path: Path) -> int:
    """Index after the leading block of top-level import lines (blank lines, comments and the
    docstring before it are skipped); the line inserted there runs after those imports."""
    seen = False
    last = -1
    for i, line in enumerate(lines):
        s = line.rstrip("\r\n")
        if _IMPORT.match(s):
            seen, last = True, i
        elif seen and s.strip() and not s.startswith("#"):
            break
    if not seen:
        raise PatchError(f"{path}: no top-level import statement found to insert after")
    return last + 1


def _target(root: Path, p: Patch) -> Path:
    path = Path(root) / p.file
    if not path.is_file():
        raise PatchError(f"{path} does not exist: is {root} an OpenGait checkout?")
    return path


def is_applied(root: Path, p: Patch) -> bool:
    lines = _target(root, p).read_bytes().decode("utf-8").splitlines(keepends=True)
    return any(line.rstrip("\r\n") == p.insert for line in lines)


def apply(root: Path) -> List[str]:
    out = []
    for p in load_patches():
        path = _target(root, p)
        text = path.read_bytes().decode("utf-8")
        lines = text.splitlines(keepends=True)
        if any(line.rstrip("\r\n") == p.insert for line in lines):
            out.append(f"{p.name}: already applied to {path}")
            continue
        i = _anchor_index(lines, path)
        nl = _newline(text)
        if not lines[i - 1].endswith(("\n", "\r")):
            raise PatchError(f"{path}: ends in an import line without a newline; cannot insert after it "
                             "and still revert byte for byte")
        lines.insert(i, p.insert + nl)
        path.write_bytes("".join(lines).encode("utf-8"))
        out.append(f"{p.name}: applied to {path} (line {i + 1})")
    return out


def revert(root: Path) -> List[str]:
    out = []
    for p in load_patches():
        path = _target(root, p)
        lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
        keep = [line for line in lines if line.rstrip("\r\n") != p.insert]
        if len(keep) == len(lines):
            out.append(f"{p.name}: not applied to {path}")
            continue
        path.write_bytes("".join(keep).encode("utf-8"))
        out.append(f"{p.name}: reverted in {path}")
    return out


def status(root: Path) -> List[str]:
    return [f"{p.name}: {'applied' if is_applied(root, p) else 'not applied'} ({_target(root, p)})"
            for p in load_patches()]


ACTIONS = {"apply": apply, "revert": revert, "status": status}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=list(ACTIONS))
    p.add_argument("--root", default=None, help="OpenGait checkout (default: $OPENGAIT_ROOT)")


def run(args: argparse.Namespace) -> int:
    from .env import find_root

    for line in ACTIONS[args.action](find_root(args.root)):
        print(line)
    return 0
