"""OpenGait's on-disk layout for silhouette data sets, and CASIA-B's names within it.

A data set is ``root/<id>/<type>/<view>/<name>.pkl``: each file a pickled uint8 array
``[frames, h, w]`` (64 x 64 after OpenGait's pretreatment, which names the file after the view),
plus a partition JSON naming the subject directories of ``TRAIN_SET`` and ``TEST_SET`` (Gait3D adds
``PROBE_SET``; other keys are kept as they are). CASIA-B's types are ``nm-01..06``, ``bg-01/02`` and
``cl-01/02`` over 11 views from 0 to 180 degrees; its protocol takes ``nm-01..04`` as the gallery
and three probe conditions, NM, BG and CL.

The generator, the built-in host and the test fixtures all read and write through this module, so
the format is decided here once. Reading does not run ``pickle.load`` on the file: it rebuilds numpy
arrays and refuses anything else, so a data folder from elsewhere cannot run code.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import write_atomic
from .errors import QGaitError, short_repr

PathLike = Union[str, "os.PathLike[str]"]

#: CASIA-B's ten sequence types: normal walking, with a bag, in a coat
CASIA_B_TYPES: Tuple[str, ...] = tuple(f"nm-{i:02d}" for i in range(1, 7)) + ("bg-01", "bg-02", "cl-01", "cl-02")
#: CASIA-B's eleven view angles in degrees (directory names are zero-padded: ``018``)
CASIA_B_VIEWS: Tuple[int, ...] = tuple(range(0, 181, 18))
#: the protocol's gallery: the first four normal walks
GALLERY_TYPES: Tuple[str, ...] = ("nm-01", "nm-02", "nm-03", "nm-04")
#: the protocol's probe conditions and their types
PROBE_TYPES: Dict[str, Tuple[str, ...]] = {"NM": ("nm-05", "nm-06"), "BG": ("bg-01", "bg-02"),
                                           "CL": ("cl-01", "cl-02")}

#: name of the partition file next to the subject directories
PARTITION_NAME = "partition.json"
#: partition keys every data set has
SPLITS = ("TRAIN_SET", "TEST_SET")
#: fixed so that the same frames always give the same bytes
PICKLE_PROTOCOL = 4


class DataError(QGaitError, ValueError):
    """A data file (sequence pickle or partition JSON) that cannot be used; the message names the file."""


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def subject_id(index: int) -> str:
    """CASIA-B style zero-padded subject id (``1 -> '001'``)."""
    return f"{index:03d}"


def view_name(view: Union[int, str]) -> str:
    """CASIA-B style view directory name (``18 -> '018'``)."""
    return f"{int(view):03d}"


def sequence_path(root: PathLike, sid: str, seq_type: str, view: str) -> Path:
    """``root/<id>/<type>/<view>/<view>.pkl``: the file named after the view, as OpenGait's pretreatment writes."""
    return Path(root) / sid / seq_type / view / f"{view}.pkl"


def write_sequence(root: PathLike, sid: str, seq_type: str, view: str, frames: np.ndarray) -> Path:
    """Pickle uint8 frames ``[T, H, W]`` to the sequence's path (whole or not at all); returns the path."""
    if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[0] == 0:
        raise DataError(f"write_sequence {sid}/{seq_type}/{view}: expected non-empty uint8 [T, H, W], "
                        f"got {frames.dtype} {frames.shape}")
    path = sequence_path(root, sid, seq_type, view)
    data = pickle.dumps(np.ascontiguousarray(frames), protocol=PICKLE_PROTOCOL)
    write_atomic(str(path), lambda tmp: _write(tmp, data), sync=False)
    return path


#: the globals a pickled numpy array refers to (numpy 1 and 2 module names; protocols 2 to 5)
_ARRAY_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol 2 stores the raw bytes
})


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: any other global in the stream is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} (only numpy arrays are read)")
        return super().find_class(module, name)


def read_sequence(path: PathLike) -> np.ndarray:
    """One sequence file's frames, uint8 ``[T, H, W]`` with ``T >= 1``, without running arbitrary pickles.

    Anything else is a :class:`DataError` naming the file: a pickle of anything but a numpy array,
    an array that is not 3-D, one with no frames (or empty frames), and one that is not uint8. No
    dtype is converted: OpenGait's transform divides by 255 whatever the dtype, so float frames in
    [0, 1] would train as near-black images there; the message says how to convert them instead.
    """
    try:
        with open(path, "rb") as f:
            arr = _ArrayUnpickler(f).load()
    except FileNotFoundError:
        raise DataError(f"{path}: sequence file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; expected a sequence file (.pkl)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError, OverflowError, RecursionError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a pickled numpy array ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 3:
        got = f"shape {arr.shape}" if isinstance(arr, np.ndarray) else f"a {type(arr).__name__}"
        raise DataError(f"{path}: holds {got}; expected a numpy array of frames [T, H, W]")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(f"{path}: holds {arr.shape[0]} frames of {arr.shape[1]} x {arr.shape[2]}; a sequence needs "
                        "at least one non-empty frame")
    if arr.dtype != np.uint8:
        hint = (" (for frames in [0, 1]: (frames * 255).round().astype(np.uint8))"
                if arr.dtype.kind == "f" else "")
        raise DataError(f"{path}: frames are {arr.dtype}; expected uint8 silhouettes 0..255, OpenGait's format, "
                        f"which its transform divides by 255. Convert and save them again{hint}")
    return arr


@dataclass(frozen=True)
class SequenceFile:
    """Where one sequence lives: its labels and the first ``.pkl`` in its directory."""

    sid: str
    type: str
    view: str
    path: Path


def _subdirs(d: Path) -> List[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir())


def list_sequences(root: PathLike, ids: Sequence[str], partition: Optional[PathLike] = None,
                   missing_ok: bool = False) -> List[SequenceFile]:
    """Every sequence of the given subject ids under ``root``, sorted by id, type, view.

    Sequence directories without a ``.pkl`` are skipped (the generator writes none for a walk that
    left the image); a directory with several ``.pkl`` files is one sequence, read from the first.
    Hidden files (a write still in progress) are not sequences. An id with no sequence at all (no
    directory, or none with a ``.pkl``) is a :class:`DataError` naming the ids and ``partition``
    (the file that listed them), since training on part of a split silently is a different
    experiment; ``missing_ok=True`` skips them instead.
    """
    root_p = Path(root)
    if not root_p.is_dir():
        raise DataError(f"{root}: data set root is not a directory")
    found: List[SequenceFile] = []
    missing = []
    for sid in sorted(ids):
        sdir = root_p / sid
        n = len(found)
        if sdir.is_dir():
            for typ in _subdirs(sdir):
                for view in _subdirs(sdir / typ):
                    pkls = sorted(p for p in (sdir / typ / view).iterdir()
                                  if p.suffix == ".pkl" and not p.name.startswith(".") and p.is_file())
                    if pkls:
                        found.append(SequenceFile(sid, typ, view, pkls[0]))
        if len(found) == n:
            missing.append(sid)
    if missing and not missing_ok:
        listed = f"listed in {partition}" if partition else "asked for"
        raise DataError(f"{root}: {len(missing)} of {len(ids)} ids {listed} have no sequence files under it: "
                        f"{short_repr(missing)}; fix the partition or the data")
    return found


def read_partition(path: PathLike) -> Dict[str, Any]:
    """The partition JSON: ``TRAIN_SET`` and ``TEST_SET`` checked and given as lists of id strings.

    Other keys (``PROBE_SET``, ``VAL_SET``, ...) are kept; list values among them become strings too.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}: is empty; expected a JSON object with {list(SPLITS)}")
        part = json.loads(text)
    except FileNotFoundError:
        raise DataError(f"{path}: partition file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; expected the partition JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(part, dict):
        raise DataError(f"{path}: expected a JSON object with {list(SPLITS)}, got {type(part).__name__}")
    for key in SPLITS:
        if not isinstance(part.get(key), list):
            raise DataError(f"{path}: expected a list under {key!r}; keys found: {short_repr(list(part))}")
        bad = [x for x in part[key] if not isinstance(x, (str, int)) or isinstance(x, bool)]
        if bad:
            raise DataError(f"{path}: {key} holds {short_repr(bad)}; expected subject ids (strings)")
    return {k: [str(x) for x in v] if isinstance(v, list) else v for k, v in part.items()}


def write_partition(path: PathLike, train: Sequence[str], test: Sequence[str],
                    extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``{"TRAIN_SET": [...], "TEST_SET": [...], **extra}`` to ``path`` (all or nothing); returns it."""
    data: Dict[str, Any] = {"TRAIN_SET": list(train), "TEST_SET": list(test)}
    data.update(extra or {})
    text = (json.dumps(data, indent=1) + "\n").encode()
    write_atomic(str(path), lambda tmp: _write(tmp, text))
    return Path(path)
