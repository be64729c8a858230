"""A tiny data set in OpenGait's format and a tiny GaitBase (``Baseline``) config, for smoke runs.

Used by the integration tests and handy for checking an install on CPU in a minute:
``root/data/<id>/<type>/<view>/<view>.pkl`` holding pickled uint8 arrays ``[frames, 64, 64]`` (random
blobs per identity, so ids are weakly separable), with CASIA-B's type names so OpenGait's
CASIA-B evaluator runs on it, and ``root/partition.json`` (written by :mod:`qgait_plugin.layout`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..layout import CASIA_B_TYPES, PARTITION_NAME, subject_id, write_partition, write_sequence


def write_tiny_dataset(root: Path, n_ids: int = 6, n_train: int = 4, views: Sequence[str] = ("000", "090"),
                       frames: int = 6, seed: int = 0) -> Path:
    """Write the data set under ``root/data`` and ``root/partition.json``; returns the partition path."""
    rng = np.random.default_rng(seed)
    data = Path(root) / "data"
    ids = [subject_id(i) for i in range(1, n_ids + 1)]
    yy, xx = np.mgrid[0:64, 0:64]
    for pid in ids:
        cy, cx, ry, rx = rng.uniform(24, 40), rng.uniform(26, 38), rng.uniform(10, 24), rng.uniform(4, 10)
        for typ in CASIA_B_TYPES:
            for view in views:
                seq = np.zeros((frames, 64, 64), np.uint8)
                for f in range(frames):
                    jy, jx = rng.normal(0, 1.5, 2)
                    seq[f][((yy - cy - jy) / ry) ** 2 + ((xx - cx - jx) / rx) ** 2 <= 1.0] = 255
                write_sequence(data, pid, typ, view, seq)
    return write_partition(Path(root) / PARTITION_NAME, ids[:n_train], ids[n_train:])


def tiny_baseline_config(root: Path, partition: Path, save_name: str, quant: Optional[Dict[str, Any]] = None,
                         total_iter: int = 2, save_iter: int = 2, restore_hint: int = 0, n_train: int = 4,
                         test_restore_hint: int = 0) -> Dict[str, Any]:
    """An OpenGait config for a narrow ``Baseline`` (ResNet9 8-16-32-64) on the tiny data set, CPU-ready."""
    cfg: Dict[str, Any] = {
        "data_cfg": {"dataset_name": "CASIA-B", "dataset_root": str(Path(root) / "data"),
                     "dataset_partition": str(partition), "num_workers": 0, "remove_no_gallery": False,
                     "cache": False, "test_dataset_name": "CASIA-B"},
        "evaluator_cfg": {"enable_float16": False, "restore_ckpt_strict": True, "restore_hint": test_restore_hint,
                          "save_name": save_name, "eval_func": "evaluate_indoor_dataset", "metric": "euc",
                          "sampler": {"batch_size": 1, "sample_type": "all_ordered", "type": "InferenceSampler"},
                          "transform": [{"type": "BaseSilCuttingTransform"}]},
        "loss_cfg": [{"loss_term_weight": 1.0, "margin": 0.2, "type": "TripletLoss", "log_prefix": "triplet"},
                     {"loss_term_weight": 1.0, "scale": 16, "type": "CrossEntropyLoss", "log_prefix": "softmax",
                      "log_accuracy": True}],
        "model_cfg": {"model": "Baseline",
                      "backbone_cfg": {"type": "ResNet9", "block": "BasicBlock", "channels": [8, 16, 32, 64],
                                       "layers": [1, 1, 1, 1], "strides": [1, 2, 2, 1], "maxpool": False},
                      "SeparateFCs": {"in_channels": 64, "out_channels": 32, "parts_num": 16},
                      "SeparateBNNecks": {"class_num": n_train, "in_channels": 32, "parts_num": 16},
                      "bin_num": [16]},
        "optimizer_cfg": {"lr": 0.01, "momentum": 0.9, "solver": "SGD", "weight_decay": 0.0005},
        "scheduler_cfg": {"gamma": 0.1, "milestones": [1000], "scheduler": "MultiStepLR"},
        "trainer_cfg": {"enable_float16": False, "fix_BN": False, "with_test": False, "log_iter": 1,
                        "restore_ckpt_strict": True, "restore_hint": restore_hint, "save_iter": save_iter,
                        "save_name": save_name, "sync_BN": False, "total_iter": total_iter,
                        "find_unused_parameters": False,
                        "sampler": {"batch_shuffle": True, "batch_size": [2, 2], "frames_num_fixed": 4,
                                    "frames_num_max": 6, "frames_num_min": 2, "sample_type": "fixed_unordered",
                                    "type": "TripletSampler"},
                        "transform": [{"type": "BaseSilCuttingTransform"}]},
    }
    if quant is not None:
        cfg["quant"] = quant
    return cfg
