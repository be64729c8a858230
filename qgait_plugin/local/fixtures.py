"""A tiny random data set in OpenGait's format, for tests of the host's plumbing (not of accuracy).

Each subject gets a fixed random blob pattern plus noise, so ids are weakly separable; the layout,
types (CASIA-B's ten by default) and partition file are :mod:`qgait_plugin.layout`'s, as the real
loader expects.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..layout import CASIA_B_TYPES, PARTITION_NAME, subject_id, write_partition, write_sequence


def write_random_dataset(root: str, subjects: int = 6, views: Sequence[str] = ("000", "090"), frames: int = 8,
                         train: int = 3, seed: int = 0, types: Sequence[str] = CASIA_B_TYPES, val: int = 0) -> str:
    """Write ``root/<id>/<type>/<view>/<view>.pkl`` (uint8 ``[frames, 64, 64]``); return the partition path.

    The first ``train`` ids train, the next ``val`` form a ``VAL_SET``, the rest test."""
    rng = np.random.default_rng(seed)
    ids = [subject_id(i) for i in range(1, subjects + 1)]
    for sid in ids:
        base = rng.random((64, 64)) > 0.6
        for typ in types:
            for view in views:
                noise = rng.random((frames, 64, 64)) > 0.9
                write_sequence(root, sid, typ, view, ((base[None] ^ noise) * 255).astype(np.uint8))
    extra = {"VAL_SET": ids[train:train + val]} if val else None
    return str(write_partition(os.path.join(root, PARTITION_NAME), ids[:train], ids[train + val:], extra=extra))
