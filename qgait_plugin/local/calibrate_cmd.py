"""``qgait calibrate``: post-training quantization of a built-in-host FP checkpoint, in about a minute.

From the FP checkpoint in ``quant.init_from`` and the config's ``quant:`` section (its
``calibrate:`` part: calibration set size and seed, estimator, BatchNorm, optional objective), it
draws a seeded calibration set of training sequences, sets every quantizer's step
(:func:`qgait_plugin.calibrate.calibrate_model`) and writes the model as iteration 0 of the
config's ``save_name`` in the QAT checkpoint layout, so ``qgait test`` and ``qgait export`` read it
with the same config, and a QAT run starts from it with ``quant.init_from`` (or
``trainer_cfg.restore_hint``) set to the file.

Refused before anything is written: a config without ``quant:`` or without ``init_from``, a
calibration set larger than the training set, a checkpoint of another model, and a ``save_name``
that already holds checkpoints (unless ``--overwrite``).
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..errors import ConfigError, NonFiniteError, short_repr


def calibration_batches(seqs: Sequence[Any], samples: int, batch: int, frames: int, seed: int,
                        label_of: Dict[str, int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` distinct training sequences drawn with ``seed``, ``frames`` random frames each, in
    batches of ``batch`` grouped by subject (so a batch holds several sequences of a few people:
    the triplet loss has positives, IDC plenty of inter-class pairs)."""
    if samples > len(seqs):
        raise ConfigError(f"quant.calibrate.samples: {samples}, but the training set has only {len(seqs)} sequences")
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(seqs)), samples), key=lambda i: (seqs[i].sid, i))
    from .data import collate_fixed

    return [collate_fixed(seqs, picked[j:j + batch], frames, rng, label_of) for j in range(0, samples, batch)]


def calibrate_checkpoint(cfg: Dict[str, Any], progress: bool = True, announce: bool = True,
                         overwrite: bool = False) -> Dict[str, Any]:
    """Calibrate the model ``cfg`` describes and write its checkpoint; returns ``{"checkpoint", "info",
    "wall_seconds"}``. ``cfg`` is a loaded config (:func:`~qgait_plugin.local.config.load_config`)."""
    from ..calibrate import calibrate_model
    from ..checkpoint import write_checkpoint
    from ..teacher import make_teacher
    from .config import loss_terms
    from .losses import build_losses
    from .trainer import Trainer, _first_non_finite, checkpoint_path, load_fp_weights

    t0 = time.perf_counter()
    quant = cfg.get("quant")
    if quant is None:
        raise ConfigError("the config has no quant: section; calibrate writes a quantized model (add quant: with "
                          "init_from)")
    if not quant.init_from:
        raise ConfigError("quant.init_from: calibration starts from a full-precision checkpoint; give its path")
    c = quant.calibrate
    tr = Trainer(cfg, progress=progress, announce=announce)
    seqs = tr.train_seqs()
    if c.samples > len(seqs):
        raise ConfigError(f"quant.calibrate.samples: {c.samples}, but the training set "
                          f"({cfg['data_cfg']['dataset_partition']}) has only {len(seqs)} sequences")
    fp_state = load_fp_weights(tr.model, quant.init_from, announce)  # another model's checkpoint stops here
    ids = sorted({s.sid for s in seqs})
    class_num = cfg["model_cfg"]["SeparateBNNecks"]["class_num"]
    if c.objective == "task" and len(ids) > class_num:
        raise ConfigError(f"model_cfg.SeparateBNNecks.class_num: {class_num} but the training set has {len(ids)} "
                          "identities")
    tr._check_fresh_run(overwrite)
    label_of = {sid: i for i, sid in enumerate(ids)}
    frames = c.frames or int(cfg["trainer_cfg"]["sampler"]["frames_num_fixed"])
    dev = tr.device
    batches = [(x.to(dev), y.to(dev)) for x, y in
               calibration_batches(seqs, c.samples, c.batch, frames, c.seed, label_of)]
    teacher = make_teacher(tr.model, fp_state).to(dev) if c.objective in ("idc", "kd", "recon") else None
    losses = build_losses(loss_terms(cfg))

    def task_loss(out: Dict[str, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=dev)
        for _prefix, w, key, fn in losses:
            total = total + w * fn(out[key], b[1])[0]
        return total

    torch.manual_seed(c.seed)
    info = calibrate_model(tr.model, batches, quant, forward=lambda m, b: m(b[0]), embed=lambda o: o["embeddings"],
                           labels=lambda b: b[1], teacher=teacher, task_loss=task_loss, progress=progress)
    bad = _first_non_finite(tr.model.state_dict())
    if bad:
        raise NonFiniteError(f"calibration left non-finite values in {len(bad)} tensors (e.g. {short_repr(bad[:3])}); "
                             "nothing written")
    tr.iteration = 0
    tr.train_seconds = info["seconds"]["total"]
    st = tr.state_dict()
    st["calibration"] = {k: v for k, v in info.items() if k != "loss"}
    st["calibration"]["loss"] = [float(v) for v in info.get("loss", [])]
    st["calibration"]["init_from"] = quant.init_from
    path = checkpoint_path(tr.out_dir, tr.save_name, 0)
    write_checkpoint(st, path)
    return {"checkpoint": path, "info": info, "wall_seconds": time.perf_counter() - t0, "trainer": tr}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfgs", required=True, help="YAML config with quant: (init_from, calibrate: ...), e.g. "
                                                 "configs/demo/w8a8_ptq.yaml")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints an earlier run left under the same save_name")


def run(args: argparse.Namespace) -> int:
    from .config import load_config

    res = calibrate_checkpoint(load_config(args.cfgs), progress=not args.no_progress, overwrite=args.overwrite)
    info = res["info"]
    s = info["seconds"]
    obj = info["objective"]
    if obj != "none" and "loss_first" in info:
        obj += f" (loss {info['loss_first']:.4g} -> {info['loss_last']:.4g})"
    print(f"calibrated {info['quantizers']['weights']} weight and {info['quantizers']['activations']} activation "
          f"quantizers on {info['batches']} batches: estimator {info['estimator']}, BatchNorm {info['bn']}, "
          f"objective {obj}")
    print(f"wall time {res['wall_seconds']:.1f} s (statistics {s['statistics']:.1f} s, BatchNorm {s['bn']:.1f} s, "
          f"objective {s['objective']:.1f} s); checkpoint {res['checkpoint']}")
    return 0
