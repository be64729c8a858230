"""A tiny random data set in OpenGait's format, for tests of the host's plumbing (not of accuracy).

Each subject gets a fixed random blob pattern plus noise, so ids are weakly separable; the layout,
types (nm-01..06, bg-01/02, cl-01/02) and partition file are exactly what the real loader expects.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Sequence

import numpy as np

TYPES = ("nm-01", "nm-02", "nm-03", "nm-04", "nm-05", "nm-06", "bg-01", "bg-02", "cl-01", "cl-02")


def write_random_dataset(root: str, subjects: int = 6, views: Sequence[str] = ("000", "090"), frames: int = 8,
                         train: int = 3, seed: int = 0, types: Sequence[str] = TYPES) -> str:
    """Write ``root/<id>/<type>/<view>/sils.pkl`` (uint8 ``[frames, 64, 64]``); return the partition path."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:03d}" for i in range(1, subjects + 1)]
    for sid in ids:
        base = rng.random((64, 64)) > 0.6
        for typ in types:
            for view in views:
                d = os.path.join(root, sid, typ, view)
                os.makedirs(d, exist_ok=True)
                noise = rng.random((frames, 64, 64)) > 0.9
                arr = ((base[None] ^ noise) * 255).astype(np.uint8)
                with open(os.path.join(d, f"{sid}-{typ}-{view}.pkl"), "wb") as f:
                    pickle.dump(arr, f)
    part = os.path.join(root, "partition.json")
    with open(part, "w") as f:
        json.dump({"TRAIN_SET": ids[:train], "TEST_SET": ids[train:]}, f)
    return part
