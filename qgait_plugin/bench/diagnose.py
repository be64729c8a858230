"""``qgait diagnose``: does a quantized network still see the fine detail of its silhouettes?

QGait's motivation: gait models read binarized silhouettes, where a one-pixel change of the
outline carries identity (stride, posture, a bag's edge). A network trained with the
straight-through estimator may become insensitive to such changes (they vanish in the rounding),
or over-sensitive (a boundary pixel flips a whole quantization level). This measures it.

Test sequences are perturbed with kornia's morphology (1-pixel erosion and dilation of the
silhouette) and by flipping a few pixels on its boundary. For each model (the FP reference and,
from a finished ``qgait bench accuracy`` run, e.g. LSQ, two-phase and QGait at one bit width and
seed) and each layer, the movement of that layer's output, ``||f(x') - f(x)||``, is divided by the
mean distance between the outputs of *different people's* clean sequences at the same layer. A
ratio near 0 means the layer ignores the perturbation; the FP network's ratios are the reference.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, DamagedFile, InputNotFound
from ..quant.placement import paused
from .methods import METHODS

PERTURBATIONS = ("erode", "dilate", "flip_boundary")
#: layers of the built-in GaitBaseLite whose outputs are compared (module names)
DEFAULT_LAYERS = ("Backbone.conv1", "Backbone.layers.0", "Backbone.layers.1", "Backbone.layers.2", "HPP", "FCs")


def perturb(x: Any, kind: str, flips: int = 4, seed: int = 0) -> Any:
    """``x``: silhouettes ``[n, s, h, w]`` in [0, 1]. Returns the perturbed copy (same shape)."""
    import torch
    from kornia.morphology import dilation, erosion

    n, s, h, w = x.shape
    flat = x.reshape(n * s, 1, h, w)
    kernel = torch.ones(3, 3, dtype=x.dtype)
    if kind == "erode":
        out = erosion(flat, kernel)
    elif kind == "dilate":
        out = dilation(flat, kernel)
    elif kind == "flip_boundary":
        binary = (flat > 0.5).to(x.dtype)
        boundary = (dilation(binary, kernel) - erosion(binary, kernel)) > 0
        gen = torch.Generator().manual_seed(seed)
        score = torch.rand(flat.shape, generator=gen) * boundary
        # the `flips` highest-scoring boundary pixels of each frame flip (1 - x)
        thresh = score.reshape(n * s, -1).topk(flips, dim=1).values[:, -1:].reshape(n * s, 1, 1, 1)
        pick = (score >= thresh) & boundary
        out = torch.where(pick, 1.0 - flat, flat)
    else:
        raise ConfigError(f"perturbation {kind!r} is not one of {list(PERTURBATIONS)}")
    return out.reshape(n, s, h, w)


def layer_outputs(model: Any, x: Any, layers: Sequence[str]) -> Dict[str, Any]:
    """Outputs of the named modules for input ``x``, each flattened per sequence: ``[n, features]``."""
    import torch

    mods = dict(model.named_modules())
    missing = [name for name in layers if name not in mods]
    if missing:
        raise ConfigError(f"--layers: {missing} are not modules of {type(model).__name__}; "
                          f"some names: {list(mods)[1:8]}")
    got: Dict[str, torch.Tensor] = {}
    hooks = []
    for name in layers:
        def hook(_m: Any, _i: Any, out: Any, name: str = name) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            with paused(model):  # the copy is not the model's own op: a placed site must not see it
                got[name] = t.detach().float()
        hooks.append(mods[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    n = x.shape[0]
    return {k: v.reshape(n, -1) for k, v in got.items()}


def sensitivity(model: Any, clean: Any, ids: Sequence[str], layers: Sequence[str],
                perturbations: Sequence[str] = PERTURBATIONS, flips: int = 4) -> Dict[str, Dict[str, float]]:
    """``{perturbation: {layer: mean movement / mean inter-identity distance}}`` on ``clean`` ``[n, s, h, w]``."""
    import torch

    model.eval()
    base = layer_outputs(model, clean, layers)
    ids_a = np.asarray(ids)
    diff = torch.from_numpy(ids_a[:, None] != ids_a[None, :])
    scale = {}
    for k, f in base.items():
        d = torch.cdist(f, f)
        scale[k] = float(d[diff].mean())
    out: Dict[str, Dict[str, float]] = {}
    for kind in perturbations:
        moved = layer_outputs(model, perturb(clean, kind, flips), layers)
        out[kind] = {k: float((moved[k] - base[k]).norm(dim=1).mean()) / max(scale[k], 1e-12) for k in layers}
    return out


def _bench_models(bench_dir: Path, bits: int, seed: int, methods: Sequence[str]) -> Tuple[Dict[str, Any], Any, Any]:
    """Rebuild the models of a finished benchmark: the FP reference plus ``methods`` at ``bits``/``seed``.

    Every file is verified before it is used: ``results.json`` and each run's record by their digests,
    the records' data, FP reference and code version against ``results.json``, and each checkpoint by
    the SHA-256 its record holds. A folder a later benchmark partly overwrote (another ``--data-seed``,
    interrupted) is refused, naming the file that no longer belongs."""
    from ..local.config import build_config
    from ..local.trainer import Trainer
    from ..records import read_record
    from .accuracy import job_digest, load_bench_config, plan_jobs

    res_file = bench_dir / "results.json"
    if not res_file.is_file():
        raise InputNotFound(f"{res_file}: not found; run `qgait bench accuracy --out {bench_dir}` first")
    meta = read_record(res_file, "benchmark results").get("meta")
    need = ("config", "config_file", "data", "fp_reference", "provenance")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise DamagedFile(f"{res_file}: holds no complete 'meta' section (needs {list(need)}); it was not written by "
                          "a finished `qgait bench accuracy` of this version: run it again")
    conf = meta["config"]
    for key, value, allowed in (("--bits", bits, conf["qat"]["bits"]), ("--seed", seed, conf["qat"]["seeds"])):
        if value not in allowed:
            raise ConfigError(f"{key}: {value} is not in the benchmark's runs ({allowed}) in {res_file}")
    cfg = load_bench_config(Path(meta["config_file"]), quick=bool(meta.get("quick", False)))
    cfg.update({k: v for k, v in conf.items() if k in ("data", "fp", "qat", "qgait", "kd")})
    data, fp = Path(meta["data"]), meta["fp_reference"]
    fp_ckpt = fp["checkpoint"]
    _check_file(fp_ckpt, fp.get("checkpoint_sha256"), "the FP reference", res_file)
    models: Dict[str, Any] = {}
    jobs = {j["method"]: j for j in plan_jobs(cfg, data, bench_dir, fp_ckpt, "TEST_SET", methods=list(methods),
                                              bits_list=[bits], seeds=[seed])}
    fp_job = plan_jobs(cfg, data, bench_dir, fp_ckpt, "TEST_SET", methods=["fp_continued"], seeds=[seed])[0]
    fp_cfg = build_config(fp_job["host_cfg"], src="fp reference")
    tr = Trainer(fp_cfg, progress=False)
    tr.restore(fp_ckpt, source="fp reference")
    models["fp"] = tr.model
    for method in methods:
        job = jobs[method]
        rec_file = bench_dir / "runs" / f"{job['name']}.json"
        rec = read_record(rec_file, "run record")
        if rec.get("provenance") != meta["provenance"] or rec.get("digest") != job_digest(job):
            raise DamagedFile(f"{rec_file}: made by another benchmark than {res_file} (data, FP reference, config "
                              f"or code differ: {rec.get('provenance')} vs {meta['provenance']}); the folder mixes "
                              "two runs. Rerun `qgait bench accuracy` into it to completion, or into an empty --out")
        _check_file(rec["checkpoint"], rec.get("checkpoint_sha256"), job["name"], rec_file)
        hc = build_config(job["host_cfg"], src=job["name"])
        tr = Trainer(hc, progress=False)
        tr.restore(rec["checkpoint"], source=f"{job['name']} (its final checkpoint)")
        print(f"[diagnose] {method}: {rec['checkpoint']}")
        models[method] = tr.model
    return models, fp_cfg, data


def _check_file(path: str, sha: Any, what: str, record: Path) -> None:
    """``path`` exists and still has the SHA-256 ``record`` gives it (not replaced by a later run)."""
    from .accuracy import file_sha256

    if not Path(path).is_file():
        raise InputNotFound(f"{path}: checkpoint of {what} named by {record} is gone; rerun the benchmark")
    if sha is None or file_sha256(path) != sha:
        raise DamagedFile(f"{path}: checkpoint of {what} is not the one {record} was made from (its SHA-256 "
                          "differs: replaced by a later run, or damaged); rerun the benchmark into this folder")


def run_diagnose(bench_dir: Path, bits: int, seed: int, methods: Sequence[str], sequences: int = 120,
                 frames: int = 12, layers: Sequence[str] = DEFAULT_LAYERS, flips: int = 4) -> Dict[str, Any]:
    import torch

    from ..local.data import load_split

    if sequences < 2:
        raise ConfigError(f"--sequences: {sequences}; need at least 2 (distances between different people)")
    if frames < 1:
        raise ConfigError(f"--frames: {frames}; need at least 1")
    if flips < 1:
        raise ConfigError(f"--flips: {flips}; need at least 1")
    unknown = [m for m in methods if m not in METHODS or m == "fp_continued"]
    if unknown or not methods:
        raise ConfigError(f"--methods: {unknown or methods} are not benchmark methods; choose from "
                          f"{[m for m in METHODS if m != 'fp_continued']}")
    models, fp_cfg, _ = _bench_models(bench_dir, bits, seed, methods)
    seqs = [s for s in load_split(fp_cfg["data_cfg"], "TEST_SET", progress=False) if s.frames.shape[0] >= frames]
    if len({s.sid for s in seqs}) < 2:
        raise ConfigError(f"--frames: {frames}; fewer than 2 test subjects have sequences that long")
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(seqs), size=min(sequences, len(seqs)), replace=False).tolist())
    clean = torch.stack([seqs[i].frames[:frames] for i in pick]).float().div(255.0)
    ids = [seqs[i].sid for i in pick]
    table = {name: sensitivity(m, clean, ids, layers, flips=flips) for name, m in models.items()}
    return {"bits": bits, "seed": seed, "sequences": len(pick), "frames": frames, "layers": list(layers),
            "flips": flips, "sensitivity": table}


def markdown(res: Mapping[str, Any]) -> str:
    models = list(res["sensitivity"])
    lines = [f"Layer output movement / mean inter-identity distance, W{res['bits']}A{res['bits']} seed "
             f"{res['seed']}, {res['sequences']} test sequences of {res['frames']} frames (boundary flips: "
             f"{res['flips']} px/frame).", ""]
    for kind in PERTURBATIONS:
        lines += [f"**{kind}**", "", "| layer | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        for layer in res["layers"]:
            cells = " | ".join(f"{res['sensitivity'][m][kind][layer]:.3f}" for m in models)
            lines.append(f"| {layer} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, res: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PERTURBATIONS), figsize=(4 * len(PERTURBATIONS), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], PERTURBATIONS):
        for i, (m, table) in enumerate(res["sensitivity"].items()):
            ax.plot(range(len(res["layers"])), [table[kind][layer] for layer in res["layers"]], "o-", ms=3,
                    label=m, color=f"C{i}")
        ax.set_xticks(range(len(res["layers"])))
        ax.set_xticklabels([layer.split(".")[-1] if "." in layer else layer for layer in res["layers"]],
                           fontsize=7, rotation=30)
        ax.set_title(kind, fontsize=9)
        ax.set_ylabel("movement / inter-identity distance", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bench-dir", default="runs/bench-accuracy", help="a finished `qgait bench accuracy --out` folder")
    p.add_argument("--bits", type=int, default=3, help="bit width of the quantized models (default 3)")
    p.add_argument("--seed", type=int, default=0, help="QAT seed of the models (default 0)")
    p.add_argument("--methods", default="lsq,two_phase,qgait",
                   help="comma list of benchmark methods to compare with FP")
    p.add_argument("--sequences", type=int, default=120, help="test sequences to perturb (default 120)")
    p.add_argument("--frames", type=int, default=12, help="frames per sequence (default 12)")
    p.add_argument("--flips", type=int, default=4, help="boundary pixels flipped per frame (default 4)")
    p.add_argument("--out", default=None, help="output folder (default: BENCH_DIR/diagnose)")


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_writable, write_text_atomic

    bench = Path(args.bench_dir)
    methods = [m for m in args.methods.split(",") if m]
    out = Path(args.out) if args.out else bench / "diagnose"
    check_writable(str(out), "--out")
    res = run_diagnose(bench, args.bits, args.seed, methods, args.sequences, args.frames, flips=args.flips)
    md = markdown(res)
    write_text_atomic(str(out / f"diagnose_w{args.bits}.json"), json.dumps(res, indent=1))
    write_text_atomic(str(out / f"diagnose_w{args.bits}.md"), md + "\n")
    plot(out / f"diagnose_w{args.bits}.png", res)
    print(md)
    print(f"[diagnose] wrote {out}/diagnose_w{args.bits}.md, .json, .png")
    return 0

