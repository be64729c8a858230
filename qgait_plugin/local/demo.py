"""``qgait demo``: the whole method on a fresh CPU machine, in minutes.

Steps, each timed and printed: generate the data set (if missing) -> train FP -> evaluate FP ->
calibrate a W8A8 model from the FP checkpoint without training (post-training quantization,
``qgait calibrate``) -> for W8A8 and W3A3, fine-tune from the FP checkpoint with plain
LSQ-STE and with QGait (STE phase, then soft rounding + IDD) on the same iteration budget ->
evaluate each -> write ``results.md``, ``results.json`` and plots into the output folder. The run
is driven by ``configs/demo/*.yaml``
(real configs a user can pass to ``qgait train``); the demo overrides only paths, and sizes for
``--quick``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import ConfigError, InputNotFound
from .config import merge_dicts

METHODS = ("fp", "w8a8_ptq", "w8a8_lsq", "w8a8_qgait", "w3a3_lsq", "w3a3_qgait")
#: methods that calibrate the FP checkpoint (``qgait calibrate``) instead of training
PTQ = ("w8a8_ptq",)

#: generator settings of the default demo set (CASIA-B structure, fewer views and frames for CPU time)
DATA_DEFAULT: Dict[str, Any] = dict(subjects=50, frames=20, views=(0, 36, 72, 108, 144, 180), height=64, width=56)
#: the --quick set: enough structure for every condition, tiny everywhere else
DATA_QUICK: Dict[str, Any] = dict(subjects=8, frames=8, views=(0, 90), height=64, width=56)

QUICK_FP: Dict[str, Any] = {
    "trainer_cfg": {"total_iter": 20, "save_iter": 20, "log_iter": 5,
                    "sampler": {"batch_size": [4, 2], "frames_num_fixed": 6}},
    "scheduler_cfg": {"milestones": []},
    "evaluator_cfg": {"sampler": {"frames_all_limit": 8}}}
QUICK_QAT_ITERS = 6
#: --quick calibration set: the quick data set has few training sequences
QUICK_CALIBRATE: Dict[str, Any] = {"samples": 16, "batch": 8, "frames": 4}


def demo_config_dir() -> Path:
    """``configs/demo`` of the source tree (next to the package)."""
    d = Path(__file__).resolve().parents[2] / "configs" / "demo"
    if not (d / "fp.yaml").is_file():
        raise InputNotFound(f"demo configs not found at {d}; run from a checkout of qgait-plugin "
                            "(or pass --configs DIR with fp.yaml, w8a8_lsq.yaml, ...)")
    return d


#: what a demo run writes into its --out folder (besides data/, which a rerun reuses)
DEMO_OUTPUTS = ("output", "results.md", "results.json", "accuracy.png", "distances.png", "training_curves.png")
#: what `qgait ablate` adds to a finished demo folder
ABLATE_OUTPUTS = ("ablation",)
#: the demo's record of the settings it generated data and trained with
MARKER = ".qgait-demo.json"


def check_out_dir(out: Path, settings: Dict[str, Any], overwrite: bool) -> bool:
    """Refuse an --out folder whose contents a demo run would replace or mix with, unless ``overwrite``.

    Allowed without ``overwrite``: a missing or empty folder, and one holding only a data set in
    ``data/`` made with the same settings (a rerun reuses it, as documented). Refused, naming what
    is there: a file; results or checkpoints of an earlier demo; a data set generated with other
    settings (``--quick`` or not); entries no demo writes. With ``overwrite`` the run goes on and
    replaces the demo's outputs (trainers remove their old checkpoints first). Returns whether the
    existing ``data/`` must be generated again (made with other settings).
    """
    from ..errors import OutputExists, short_repr
    from ..lock import LOCK_NAME

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder for the demo's data and results")
    entries = sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME) if out.is_dir() else []
    if not entries:
        return False
    marker = out / MARKER
    try:
        before = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict):
        before = None
    other = [e for e in entries if e not in DEMO_OUTPUTS + ABLATE_OUTPUTS + ("data", MARKER)
             and not (e.startswith("ablation_w") and e.endswith(".json"))]
    results = [e for e in entries if e in DEMO_OUTPUTS or e in ABLATE_OUTPUTS or e.startswith("ablation_w")]
    stale_data = before is not None and before.get("data") != settings["data"] and "data" in entries
    problems = []
    if other:
        problems.append(f"entries no demo writes: {short_repr(other)}")
    if results:
        problems.append(f"results of an earlier demo: {short_repr(results)}")
    if stale_data:
        problems.append(f"a data set generated with other settings ({short_repr((before or {}).get('data'))})")
    if problems and not overwrite:
        raise OutputExists(f"--out {out}: holds " + "; ".join(problems) + ". A rerun would replace or mix with them: "
                           "pass --overwrite to replace the demo's outputs, or choose an empty folder")
    return stale_data


def _step(name: str, timings: Dict[str, float]):
    """Context manager printing and recording a step's wall time."""

    class _T:
        def __enter__(self):
            print(f"[demo] {name} ...", flush=True)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = time.perf_counter() - self.t0
            if exc[0] is None:
                print(f"[demo] {name}: {timings[name]:.1f} s", flush=True)

    return _T()


def run_demo(out: str, quick: bool = False, configs: Optional[str] = None, progress: bool = True,
             threads: int = 0, overwrite: bool = False) -> Dict[str, Any]:
    """Run every step into ``out``; returns the results dict also written to ``results.json``.

    ``out`` is checked first (:func:`check_out_dir`): an earlier demo's results are replaced only
    with ``overwrite``. One demo at a time writes into ``out`` (:mod:`qgait_plugin.lock`)."""
    from ..atomic import check_writable
    from ..lock import output_lock

    if threads < 0:
        raise ConfigError(f"--threads: {threads}; expected a positive number of threads, or 0 for the configs'")
    check_writable(out, "--out")
    with output_lock(out, "--out"):
        return _run_demo(out, quick, configs, progress, threads, overwrite)


def _run_demo(out: str, quick: bool, configs: Optional[str], progress: bool, threads: int,
              overwrite: bool) -> Dict[str, Any]:
    import torch

    from ..bench.accuracy_report import subject_scores
    from ..quant.size import model_size_bytes
    from .config import load_config
    from .evaluate import inter_class_distances
    from .report import plot_accuracy, plot_distances, plot_training_curves, write_tables
    from .trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg_dir = Path(configs) if configs else demo_config_dir()
    missing = [f"{name}.yaml" for name in METHODS if not (cfg_dir / f"{name}.yaml").is_file()]
    if missing:  # found before the data set is generated, not after
        raise InputNotFound(f"--configs {cfg_dir}: missing {missing}")
    out_p = Path(out)
    data = out_p / "data"
    part = data / "partition.json"
    data_settings = {k: list(v) if isinstance(v, tuple) else v
                     for k, v in (DATA_QUICK if quick else DATA_DEFAULT).items()}
    settings = {"command": "demo", "quick": quick, "data": data_settings}
    if check_out_dir(out_p, settings, overwrite):
        shutil.rmtree(data)  # generated with other settings; --overwrite allows replacing it
    if overwrite:  # ablations of the old FP checkpoint would no longer match the new one
        for stale in [out_p / "ablation", *out_p.glob("ablation_w*.json")]:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
                print(f"[demo] --overwrite: removed {stale}")
            elif stale.is_file():
                stale.unlink()
                print(f"[demo] --overwrite: removed {stale}")
    out_p.mkdir(parents=True, exist_ok=True)
    (out_p / MARKER).write_text(json.dumps(settings) + "\n")
    timings: Dict[str, float] = {}
    t_all = time.perf_counter()
    with _step("generate data", timings):
        if part.is_file():
            print(f"[demo] using existing data set {data}")
        else:
            from ..synth import generate_dataset

            generate_dataset(data, seed=0, progress=progress, workers=1 if quick else 2,
                             **(DATA_QUICK if quick else DATA_DEFAULT))
    paths: Dict[str, Dict[str, Any]] = {"data_cfg": {"dataset_root": str(data), "dataset_partition": str(part)},
                                        "trainer_cfg": {"output_root": str(out_p / "output"), "overwrite": overwrite}}
    if threads:
        paths["trainer_cfg"]["num_threads"] = threads

    results: Dict[str, Dict[str, Any]] = {}
    histories: Dict[str, Any] = {}
    distances: Dict[str, np.ndarray] = {}
    fp_ckpt = None
    for name in METHODS:
        over = merge_dicts(paths, QUICK_FP) if quick else copy.deepcopy(paths)
        if name in PTQ:
            over = merge_dicts(over, {"quant": {"init_from": fp_ckpt}})
            if quick:
                over = merge_dicts(over, {"quant": {"calibrate": QUICK_CALIBRATE}})
        elif name != "fp":
            over = merge_dicts(over, {"quant": {"init_from": fp_ckpt}})
            if quick:
                half = QUICK_QAT_ITERS // 2
                sched = {"ste_iters": QUICK_QAT_ITERS, "soft_iters": 0} if name.endswith("lsq") else \
                    {"ste_iters": half, "soft_iters": QUICK_QAT_ITERS - half}
                over = merge_dicts(over, {"trainer_cfg": {"total_iter": QUICK_QAT_ITERS, "save_iter": QUICK_QAT_ITERS},
                                     "quant": {"schedule": sched}})
        cfg = load_config(str(cfg_dir / f"{name}.yaml"), overrides=over)
        if name in PTQ:
            from .calibrate_cmd import calibrate_checkpoint

            with _step(f"calibrate {name}", timings):
                cal = calibrate_checkpoint(cfg, progress=progress, overwrite=overwrite)
            trainer = cal["trainer"]
            tr = {"train_seconds": cal["wall_seconds"], "iteration": 0, "history": [], "checkpoint": cal["checkpoint"]}
        else:
            trainer = Trainer(cfg, progress=progress)
            with _step(f"train {name}", timings):
                tr = trainer.train()
        if name == "fp":
            fp_ckpt = tr["checkpoint"]
        with _step(f"eval {name}", timings):
            ev = trainer.evaluate()
        q = cfg["quant"]
        results[name] = {
            "rank1": {k: round(v, 2) for k, v in ev["rank1"].items()},
            "rank1_per_view": ev["rank1_per_view"],
            "mAP": round(ev["mAP"], 2),
            "size_bytes": int(model_size_bytes(trainer.model)),
            "weight_bits": 32 if q is None else q.weight.bits,
            "act_bits": 32 if q is None else q.act.bits,
            "train_seconds": round(tr["train_seconds"], 1),
            "iterations": tr["iteration"],
            "config": str(cfg_dir / f"{name}.yaml"),
            "subject_rank1": subject_scores(ev),
        }
        histories[name] = tr["history"]
        distances[name] = inter_class_distances(ev["embeddings"], ev["ids"])
        del trainer
    with _step("report", timings):
        os.makedirs(out_p, exist_ok=True)
        plot_accuracy(str(out_p / "accuracy.png"), results)
        plot_distances(str(out_p / "distances.png"), distances)
        plot_training_curves(str(out_p / "training_curves.png"), histories)
        timings["total"] = time.perf_counter() - t_all
        md = write_tables(str(out_p), results, extra={
            "quick": quick, "step_seconds": {k: round(v, 1) for k, v in timings.items()},
            "data": {k: list(v) if isinstance(v, tuple) else v
                     for k, v in (DATA_QUICK if quick else DATA_DEFAULT).items()},
            "torch_threads": torch.get_num_threads()})
        notes = what_one_run_shows(results)
        with open(out_p / "results.md", "a") as f:
            f.write("\n" + notes + "\n")
    print("\n" + md + "\n\n" + notes + "\n")
    from .deploy import deploy_demo  # the quantized models as integer ONNX: size, latency vs FP32, agreement

    deploy_demo(out_p, results, quick=quick, progress=progress)
    print(f"[demo] wrote {out_p}/results.md, results.json, accuracy.png, distances.png, training_curves.png "
          f"in {timings['total']:.0f} s")
    return results


def what_one_run_shows(results: Dict[str, Dict[str, Any]]) -> str:
    """Per bit width: each method's gap to FP, and QGait - LSQ paired over the test subjects, said for what it is.

    The interval pools the test subjects of one seed: it says how much the difference could move
    with other test subjects, not with another training seed; ``qgait bench accuracy`` measures both.
    """
    from ..bench.stats import paired_interval

    lines = ["## What this run can and cannot show", "",
             "One seed per method. The interval of `qgait - lsq` is a 95 % paired interval over the test "
             "subjects of this one run: it covers the choice of test subjects, not the training seed, whose "
             "spread `qgait bench accuracy` measures (see the README). Read the gap to FP as the cost of "
             "the bit width; read a QGait - LSQ difference inside its interval as no difference.", ""]
    fp = results.get("fp")
    for bits in sorted({r["weight_bits"] for r in results.values() if r["weight_bits"] < 32}, reverse=True):
        lsq, qg = results.get(f"w{bits}a{bits}_lsq"), results.get(f"w{bits}a{bits}_qgait")
        if fp is None or lsq is None or qg is None:
            continue
        fp_mean = fp["rank1"]["mean"]
        ids = sorted(set(lsq["subject_rank1"]) & set(qg["subject_rank1"]))
        diff = np.array([[qg["subject_rank1"][i] - lsq["subject_rank1"][i] for i in ids]])
        iv = paired_interval(diff) if len(ids) >= 2 else None
        lsq_gap, qg_gap = lsq["rank1"]["mean"] - fp_mean, qg["rank1"]["mean"] - fp_mean
        lines.append(f"- W{bits}A{bits}: LSQ {lsq_gap:+.1f} and QGait {qg_gap:+.1f} points of mean rank-1 against "
                     f"FP; QGait - LSQ {iv if iv else 'n/a'} over {len(ids)} test subjects.")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="output/demo", help="output folder (default output/demo)")
    p.add_argument("--quick", action="store_true", help="tiny data and iteration counts (about 3 minutes at most)")
    p.add_argument("--configs", default=None, help="folder with fp.yaml, w8a8_lsq.yaml, ... (default configs/demo)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: the configs' num_threads)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results and checkpoints of an earlier demo in --out (its data set is reused when "
                        "made with the same settings)")


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, configs=args.configs, progress=not args.no_progress, threads=args.threads,
             overwrite=args.overwrite)
    return 0
