"""JSON records that verify themselves: written atomically with a digest, read back strictly.

A benchmark's per-run records and its ``results.json`` are read again later (to resume, to build
the report, by ``qgait diagnose``). A record cut short by a killed process or changed by a flipped
bit must not pass for a finished run: :func:`write_record` stores the SHA-256 of the record's
canonical JSON under :data:`DIGEST_KEY`, and :func:`read_record` refuses a file that is not JSON,
is not a mapping, has no digest or whose digest does not match, naming the file and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Mapping, Optional

from .atomic import write_text_atomic
from .errors import DamagedFile, InputNotFound

#: the key holding the digest of the rest of the record
DIGEST_KEY = "sha256"


def _digest(obj: Mapping[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_record(path: str | os.PathLike[str], obj: Mapping[str, Any], indent: Optional[int] = None) -> None:
    """Write ``obj`` (JSON-able, string keys) to ``path`` atomically, with its digest added."""
    rec = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    rec[DIGEST_KEY] = _digest(rec)
    write_text_atomic(os.fspath(path), json.dumps(rec, indent=indent) + "\n")


def read_record(path: str | os.PathLike[str], what: str = "record") -> Dict[str, Any]:
    """The mapping :func:`write_record` wrote to ``path``, digest removed.

    Raises :class:`~qgait_plugin.errors.InputNotFound` for a missing file and
    :class:`~qgait_plugin.errors.DamagedFile` (naming the file, ``what`` it is and the fault) for
    one that is cut short, not JSON, not a mapping, or whose content no longer matches its digest.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputNotFound(f"{p}: {what} not found")
    try:
        with open(p, "rb") as f:
            text = f.read().decode("utf-8")
        obj = json.loads(text)
    except UnicodeDecodeError as e:
        raise DamagedFile(f"{p}: {what} is damaged: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DamagedFile(f"{p}: {what} is damaged or cut short: not valid JSON ({e.msg} at line {e.lineno} column "
                          f"{e.colno}); delete it and run the command that writes it again") from None
    if not isinstance(obj, dict):
        raise DamagedFile(f"{p}: {what} holds a JSON {type(obj).__name__}; expected an object")
    stored = obj.pop(DIGEST_KEY, None)
    if stored is None:
        raise DamagedFile(f"{p}: {what} carries no {DIGEST_KEY} digest (written by an older qgait, or edited); "
                          "run the command that writes it again")
    if stored != _digest(obj):
        raise DamagedFile(f"{p}: {what} is damaged: its content no longer matches its {DIGEST_KEY} digest (changed "
                          "after it was written); run the command that writes it again")
    return obj
