"""``qgait patch apply|revert|status``: the smallest change that makes OpenGait's own scripts load the plugin.

A patch is our own instruction in ``patches/*.json`` (file, structural anchor, one line to insert),
never a diff with OpenGait context. The file is read with Python's own parser, not by matching text:

* ``apply`` inserts the line after the *leading import block*: the last top-level ``import`` /
  ``from ... import`` statement before the first other statement (the module docstring skipped),
  ending where the parser says that statement ends, so parenthesised and backslash-continued
  imports stay whole and an ``import`` line inside a docstring is not an import. The patched text
  must parse before it is written (atomically, keeping the file's permission bits). Idempotent.
* ``status`` says applied only when the file holds the inserted statement as a real top-level
  statement (a comment or a docstring holding the same text does not count).
* ``revert`` removes exactly the inserted line, so the file is restored byte for byte.

Line endings (LF, CRLF) and a UTF-8 byte-order mark are kept. A file that is not UTF-8, does not
parse, or cannot be written is a :class:`PatchError` naming it.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from ..atomic import write_atomic
from ..errors import QGaitError

#: the project's top-level ``patches/`` (the README's install is editable, so it sits beside the package)
PATCH_DIR = Path(__file__).resolve().parents[2] / "patches"
#: one physical line and its ending, as Python's tokenizer splits lines (\n, \r\n or \r; not form feeds)
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_BOM = "\ufeff"


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
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PatchError(f"{path}: cannot be read as a patch file ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise PatchError(f"{path}: holds a JSON {type(d).__name__}; expected an object")
        for key in ("file", "anchor", "insert"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise PatchError(f"{path}: key {key!r} missing or not a non-empty string")
        if d["anchor"] != "after_leading_imports":
            raise PatchError(f"{path}: anchor {d['anchor']!r} unknown; supported: 'after_leading_imports'")
        try:
            body = ast.parse(d["insert"]).body
        except SyntaxError:
            body = []
        if len(body) != 1 or not isinstance(body[0], (ast.Import, ast.ImportFrom)) or "\n" in d["insert"]:
            raise PatchError(f"{path}: insert must be one import statement on one line")
        return cls(path.stem, d["file"], d["anchor"], d["insert"])

    @property
    def statement(self) -> str:
        """The inserted statement as the parser sees it (positions left out), to find it in a file."""
        return ast.dump(ast.parse(self.insert).body[0])


def load_patches() -> List[Patch]:
    found = sorted(PATCH_DIR.glob("*.json"))
    if not found:
        raise PatchError(f"no patch instructions in {PATCH_DIR}: run from a source checkout installed with "
                         "`pip install -e .` (patches/ lives at the repository's top level)")
    return [Patch.load(p) for p in found]


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _lines(text: str) -> List[str]:
    """``text`` in physical lines with their endings, numbered as the parser numbers them."""
    return _LINE.findall(text)


def _read(path: Path) -> str:
    """The file's text (a leading BOM kept as ``\\ufeff``); a non-UTF-8 file is a PatchError."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PatchError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); qgait patch "
                         "edits UTF-8 files only") from None


def _parse(text: str, path: Path, what: str) -> ast.Module:
    try:
        return ast.parse(text[1:] if text.startswith(_BOM) else text, filename=str(path))
    except (SyntaxError, ValueError) as e:
        where = f" (line {e.lineno}: {e.msg})" if isinstance(e, SyntaxError) else f" ({e})"
        raise PatchError(f"{path}: {what} does not parse as Python{where}") from None


def _leading_imports(tree: ast.Module) -> List[ast.stmt]:
    """The top-level import statements before the first other statement (after the module docstring)."""
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    out: List[ast.stmt] = []
    for node in body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        out.append(node)
    return out


def _anchor_line(tree: ast.Module, path: Path) -> int:
    """Number of lines before the insertion point: the line where the leading import block ends."""
    block = _leading_imports(tree)
    if not block:
        raise PatchError(f"{path}: no top-level import statement found to insert after (the file must start with "
                         "imports, after an optional docstring)")
    end = block[-1].end_lineno
    assert end is not None  # set by ast.parse
    return end


def _applied_lines(tree: ast.Module, p: Patch) -> List[int]:
    """Line numbers of the top-level statements equal to the patch's inserted statement."""
    return [node.lineno for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom)) and ast.dump(node) == p.statement]


def _target(root: Path, p: Patch) -> Path:
    path = Path(root) / p.file
    if not path.is_file():
        raise PatchError(f"{path} does not exist: is {root} an OpenGait checkout?")
    return path


def _write(path: Path, text: str) -> None:
    """Write ``text`` (already checked to parse) in place of ``path`` in one step, keeping its mode."""
    if not os.access(path, os.W_OK) or (os.stat(path).st_mode & 0o222) == 0:
        raise PatchError(f"{path}: is read-only; make it writable (or apply the patch by hand) and try again")
    mode = os.stat(path).st_mode & 0o7777
    data = text.encode("utf-8")

    def dump(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    try:
        write_atomic(str(path), dump, mode=mode)
    except OSError as e:
        raise PatchError(f"{path}: cannot be written ({e.strerror or e})") from None


def _state(root: Path, p: Patch) -> Tuple[Path, str, ast.Module, List[int]]:
    path = _target(root, p)
    text = _read(path)
    tree = _parse(text, path, "the file")
    return path, text, tree, _applied_lines(tree, p)


def is_applied(root: Path, p: Patch) -> bool:
    return bool(_state(root, p)[3])


def apply(root: Path) -> List[str]:
    out = []
    for p in load_patches():
        path, text, tree, applied = _state(root, p)
        if applied:
            out.append(f"{p.name}: already applied to {path} (line {applied[0]})")
            continue
        lines = _lines(text)
        end = _anchor_line(tree, path)
        if not lines[end - 1].endswith(("\n", "\r")):
            raise PatchError(f"{path}: ends in an import line without a newline; cannot insert after it "
                             "and still revert byte for byte")
        nl = _newline(text)
        new = "".join(lines[:end] + [p.insert + nl] + lines[end:])
        new_tree = _parse(new, path, "the patched file")
        if _applied_lines(new_tree, p) != [end + 1]:  # would be a bug in the anchor, never silently written
            raise PatchError(f"{path}: inserting after line {end} does not give a top-level import statement; "
                             "not written")
        _write(path, new)
        out.append(f"{p.name}: applied to {path} (line {end + 1})")
    return out


def revert(root: Path) -> List[str]:
    out = []
    for p in load_patches():
        path, text, tree, applied = _state(root, p)
        lines = _lines(text)
        drop = [n for n in applied if lines[n - 1].rstrip("\r\n") == p.insert]
        if not drop:
            note = " (an edited copy of the line is there; remove it by hand)" if applied else ""
            out.append(f"{p.name}: not applied to {path}{note}")
            continue
        keep = [line for i, line in enumerate(lines, 1) if i not in drop]
        new = "".join(keep)
        _parse(new, path, "the reverted file")
        _write(path, new)
        out.append(f"{p.name}: reverted in {path}")
    return out


def status(root: Path) -> List[str]:
    out = []
    for p in load_patches():
        path, _, _, applied = _state(root, p)
        out.append(f"{p.name}: {f'applied (line {applied[0]})' if applied else 'not applied'} ({path})")
    return out


ACTIONS = {"apply": apply, "revert": revert, "status": status}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=list(ACTIONS))
    p.add_argument("--root", default=None, help="OpenGait checkout (default: $OPENGAIT_ROOT)")


def run(args: argparse.Namespace) -> int:
    from .env import find_root

    for line in ACTIONS[args.action](find_root(args.root)):
        print(line)
    return 0
