"""OpenGait's on-disk layout for silhouette data sets, and the partition file.

OpenGait lists ``root/<id>/<type>/<view>/`` directories, loads every ``*.pkl`` in a sequence
directory with ``pickle.load`` and expects each to hold an array ``[frames, 64, 64]``; the
partition JSON names the subject directories of ``TRAIN_SET`` and ``TEST_SET``. Pickle protocol
and array layout are fixed here so that the same data always gives the same bytes.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

#: Name of the partition file written next to the subject directories.
PARTITION_NAME = "partition.json"
PICKLE_PROTOCOL = 4


def subject_id(index: int) -> str:
    """CASIA-B style zero-padded subject id (``1 -> '001'``)."""
    return f"{index:03d}"


def view_name(view: int) -> str:
    """CASIA-B style view directory name (``18 -> '018'``)."""
    return f"{int(view):03d}"


def sequence_path(root: os.PathLike, sid: str, seq_type: str, view: str) -> Path:
    """``root/<id>/<type>/<view>/<view>.pkl``, the path OpenGait's pretreatment writes."""
    return Path(root) / sid / seq_type / view / f"{view}.pkl"


def write_sequence(root: os.PathLike, sid: str, seq_type: str, view: str, frames: np.ndarray) -> Path:
    """Pickle uint8 frames ``[T, 64, 64]`` to the sequence's path; returns the path."""
    if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_sequence {sid}/{seq_type}/{view}: expected non-empty uint8 [T, H, W], "
                         f"got {frames.dtype} {frames.shape}")
    path = sequence_path(root, sid, seq_type, view)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(np.ascontiguousarray(frames), f, protocol=PICKLE_PROTOCOL)
    return path


def default_split(n_subjects: int, train_fraction: float = 74 / 124) -> Tuple[List[str], List[str]]:
    """CASIA-B's large-training (LT) split scaled: the first ~60 % of ids train, the rest test."""
    if n_subjects < 2:
        raise ValueError(f"default_split: need at least 2 subjects (one to train, one to test), got {n_subjects}")
    n_train = min(max(int(round(n_subjects * train_fraction)), 1), n_subjects - 1)
    ids = [subject_id(i + 1) for i in range(n_subjects)]
    return ids[:n_train], ids[n_train:]


def write_partition(root: os.PathLike, train: Sequence[str], test: Sequence[str],
                    name: str = PARTITION_NAME) -> Path:
    """Write ``{"TRAIN_SET": [...], "TEST_SET": [...]}`` to ``root/name``; returns its path."""
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data: Dict[str, List[str]] = {"TRAIN_SET": list(train), "TEST_SET": list(test)}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_sequence(path: os.PathLike) -> np.ndarray:
    """Load one sequence file the way OpenGait's data set does (``pickle.load``)."""
    with open(path, "rb") as f:
        return pickle.load(f)
