"""``qgait opengait calibrate``: post-training quantization of an OpenGait FP checkpoint.

The OpenGait side of :func:`qgait_plugin.calibrate.calibrate_model`: the model is built from the
OpenGait config (network only, as ``qgait opengait export`` does, on the CPU), the FP weights come
from ``quant.init_from``, the calibration sequences are drawn (``quant.calibrate.seed``) from
OpenGait's own training ``DataSet`` and cut by the config's ``trainer_cfg.transform``, and the result
is written in OpenGait's checkpoint layout, ``output/<dataset>/<model>/<save_name>/checkpoints/
<save_name>-00000.pt`` with ``model`` and ``iteration`` (plus the plugin's state, as a QAT run saves
it). OpenGait's test phase reads it with ``evaluator_cfg.restore_hint`` set to that path, ``qgait
opengait export --iter``-free with the same path, and a QAT run starts from it with
``quant.init_from`` set to it.

Objectives ``idc``, ``kd`` and ``recon`` run here; ``task`` needs OpenGait's loss aggregator, which
builds its losses on CUDA under DDP, and is refused with a message.
"""
from __future__ import annotations

import importlib
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError, OutputExists


def _transforms(og_transform: Any, cfg: Any) -> List[Any]:
    trf = og_transform.get_transform(cfg)
    return trf if isinstance(trf, list) else [trf]


def opengait_batches(ds: Any, trfs: List[Any], samples: int, batch: int, frames: int, seed: int
                     ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` sequences of OpenGait's ``DataSet`` drawn with ``seed`` (grouped by subject), each cut by
    the first input's transform and ``frames`` random frames long, in batches of ``batch``."""
    if samples > len(ds):
        raise ConfigError(f"quant.calibrate.samples: {samples}, but the training set has only {len(ds)} sequences")
    rng = random.Random(seed)
    labels = {lab: i for i, lab in enumerate(ds.label_set)}
    picked = sorted(rng.sample(range(len(ds)), samples), key=lambda i: (ds.seqs_info[i][0], i))
    out = []
    for j in range(0, samples, batch):
        sils, labs = [], []
        for i in picked[j:j + batch]:
            data_list, info = ds[i]
            x = np.asarray(trfs[0](data_list[0]), dtype=np.float32)
            t = x.shape[0]
            idx = rng.sample(range(t), frames) if t >= frames else rng.choices(range(t), k=frames)
            sils.append(torch.from_numpy(x[idx]))
            labs.append(labels[info[0]])
        out.append((torch.stack(sils), torch.tensor(labs)))
    return out


def _training_dataset(data_cfg: Dict[str, Any]) -> Any:
    """OpenGait's training ``DataSet``; its logger asks for the process rank, so a one-process gloo group is
    started for it when none exists (and closed again), and the logger is set up (console only)."""
    import torch.distributed as dist

    from .runtime import init_process_group

    started = not dist.is_initialized()
    if started:
        init_process_group("cpu")
    try:
        mgr = importlib.import_module("utils.msg_manager").get_msg_mgr()
        if not hasattr(mgr, "logger"):  # OpenGait's main sets it up; the DataSet logs its id lists to it
            mgr.init_logger(".", False)
        return importlib.import_module("data.dataset").DataSet(data_cfg, True)
    finally:
        if started:
            dist.destroy_process_group()


def calibrate_opengait(cfg_path: str, root: Optional[str] = None, workdir: Optional[str] = None,
                       overwrite: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Calibrate the model of the OpenGait config ``cfg_path``; returns ``{"checkpoint", "info", "wall_seconds"}``."""
    from ..calibrate import calibrate_model
    from ..checkpoint import load_float_state_dict, read_checkpoint, write_checkpoint
    from ..config import QuantConfig
    from ..schedule import QGaitSchedule
    from ..teacher import make_teacher
    from .export import build_network, load_quant_config
    from .quant_model import PluginState

    t0 = time.perf_counter()
    og, cfgs = load_quant_config(cfg_path, root, "calibrate writes a quantized model (add quant: with init_from)")
    qc = QuantConfig.from_dict(cfgs["quant"])
    if not qc.init_from:
        raise ConfigError("quant.init_from: calibration starts from a full-precision checkpoint; give its path")
    c = qc.calibrate
    if c.objective == "task":
        raise ConfigError("quant.calibrate.objective: 'task' is not available in the OpenGait host (OpenGait's loss "
                          "aggregator builds its losses on CUDA under DDP); choose idc, kd, recon or none")
    base = Path(workdir).resolve() if workdir else og.root
    t = cfgs["trainer_cfg"]
    save = str(t["save_name"])
    ckpt = base / "output" / str(cfgs["data_cfg"]["dataset_name"]) / str(cfgs["model_cfg"]["model"]) / save / \
        "checkpoints" / f"{save}-00000.pt"
    if ckpt.exists() and not overwrite:
        raise OutputExists(f"{ckpt} exists (an earlier calibration); pass --overwrite to replace it")
    ds = _training_dataset(cfgs["data_cfg"])
    if c.samples > len(ds):
        raise ConfigError(f"quant.calibrate.samples: {c.samples}, but the training set "
                          f"({cfgs['data_cfg']['dataset_partition']}) has only {len(ds)} sequences")
    torch.manual_seed(c.seed)
    model = build_network(og, cfgs)
    fp_sd = load_float_state_dict(model, read_checkpoint(qc.init_from, "quant.init_from"),
                                  source=f"quant.init_from: {qc.init_from}")
    frames = c.frames or int((t.get("sampler") or {}).get("frames_num_fixed") or 30)
    trfs = _transforms(importlib.import_module("data.transform"), t.get("transform"))
    batches = opengait_batches(ds, trfs, c.samples, c.batch, frames, c.seed)

    def forward(m: Any, b: Tuple[torch.Tensor, torch.Tensor]) -> Any:
        n = int(b[0].shape[0])
        return m(([b[0]], b[1], ["nm-01"] * n, ["000"] * n, None))

    teacher = make_teacher(model, fp_sd) if c.objective in ("idc", "kd", "recon") else None
    info = calibrate_model(model, batches, qc, forward=forward, embed=lambda o: o["inference_feat"]["embeddings"],
                           labels=lambda b: b[1], teacher=teacher, progress=progress)
    model.qgait_state = PluginState(QGaitSchedule.from_config(qc), qc)  # as a QAT run's checkpoint holds it
    calib = {k: v for k, v in info.items() if k != "loss"}
    calib.update(loss=[float(v) for v in info.get("loss", [])], init_from=qc.init_from)
    os.makedirs(ckpt.parent, exist_ok=True)
    write_checkpoint({"model": model.state_dict(), "iteration": 0, "calibration": calib}, str(ckpt))
    return {"checkpoint": str(ckpt), "info": info, "wall_seconds": time.perf_counter() - t0}


def run(args: Any) -> int:
    """The ``calibrate`` phase of ``qgait opengait``."""
    res = calibrate_opengait(args.cfgs, root=args.root, workdir=args.workdir, overwrite=args.overwrite,
                             progress=True)
    info, s = res["info"], res["info"]["seconds"]
    print(f"calibrated {info['quantizers']['weights']} weight and {info['quantizers']['activations']} activation "
          f"quantizers on {info['batches']} batches: estimator {info['estimator']}, BatchNorm {info['bn']}, "
          f"objective {info['objective']}")
    print(f"wall time {res['wall_seconds']:.1f} s (statistics {s['statistics']:.1f} s, BatchNorm {s['bn']:.1f} s, "
          f"objective {s['objective']:.1f} s); checkpoint {res['checkpoint']}")
    return 0
