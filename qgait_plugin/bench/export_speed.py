"""Exported models on the CPU: FP32 against the integer graph, in onnxruntime and OpenVINO.

Run: ``qgait bench export`` (``--quick`` for a smoke run). Two networks, both ``GaitBaseLite``:

* ``demo``: the demo's model, widths 16-32-64, one block per stage, 16 frames of 32 x 22;
* ``gaitbase``: GaitBase's shape, BasicBlock stages 64-128-256-512 with [1, 4, 4, 1] blocks and
  strides [1, 2, 2, 1], 30 frames of 64 x 44, 16-part pooling, per-part FC 512 -> 256.

Each is exported as FP32 (BatchNorm folded by the exporter) and quantized at W8A8 and W4A4
(calibrated on binary frames in training mode, then exported through :mod:`qgait_plugin.export`);
each file is timed in each runtime at 1 and 2 threads, ``--runs`` timed runs after ``--warmup``
untimed ones, the precisions interleaved run by run so a drifting machine hits them alike.
OpenVINO runs the FP32 file twice, in the same interleaved loop: with ``INFERENCE_PRECISION_HINT=f32``
(``FP32 (f32 hint)``) and at its default precision (``FP, OpenVINO default (bf16)`` on CPUs with
AVX-512 BF16/AMX, f32 elsewhere), the FP baseline a user who does not quantize gets. Also reported:
file sizes (FP32 ONNX, int8 ONNX, the packed 4-bit file),
onnxruntime's optimized-graph op counts, the int8 files' agreement with PyTorch (cosine), the CPU's
instruction sets and the runtime versions. Prints a Markdown table and writes it with a JSON file.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

#: network name -> GaitBaseLite arguments and input size (frames, height, width)
MODELS: Dict[str, Dict[str, Any]] = {
    "demo": {"channels": (16, 32, 64), "layers": (1, 1, 1), "strides": (1, 2, 1), "out_channels": 64,
             "frames": 16, "height": 32, "width": 22},
    "gaitbase": {"channels": (64, 128, 256, 512), "layers": (1, 4, 4, 1), "strides": (1, 2, 2, 1),
                 "out_channels": 256, "frames": 30, "height": 64, "width": 44},
}
#: the --quick network (a smoke test of the whole path, not a measurement)
QUICK_MODEL: Dict[str, Any] = {"channels": (8, 16), "layers": (1, 1), "strides": (1, 2), "out_channels": 16,
                               "frames": 4, "height": 16, "width": 11}
PRECISIONS = ("fp32", "w8a8", "w4a4")


def binary_frames(n: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Silhouette-like input: a filled ellipse per frame with ragged edges, values 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(-1, 1, height)[:, None]
    xx = torch.linspace(-1, 1, width)[None, :]
    out = torch.zeros(n, frames, height, width)
    for i in range(n):
        for f in range(frames):
            ry, rx = 0.7 + 0.2 * torch.rand((), generator=g), 0.3 + 0.2 * torch.rand((), generator=g)
            body = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0
            noise = torch.rand(height, width, generator=g) < 0.05
            out[i, f] = (body ^ noise).float()
    return out


class Embeddings(nn.Module):
    """Silhouettes ``[n, s, h, w]`` in, embeddings ``[n, c, parts]`` out (no classifier)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sils: torch.Tensor) -> torch.Tensor:
        return self.model(sils)["embeddings"]


def build_models(spec: Dict[str, Any], calib: torch.Tensor, bits: Sequence[int] = (8, 4)) -> Dict[str, nn.Module]:
    """The FP32 network (BatchNorm statistics from ``calib``) and its quantized copies, calibrated.

    Quantized models: converted from the FP32 one, steps initialised and BatchNorm statistics
    refreshed by a few forward passes in training mode, as a short QAT run would leave them.
    """
    from ..local.model import GaitBaseLite, register_quant_handlers
    from ..quant.convert import quantize_model

    register_quant_handlers()
    torch.manual_seed(0)
    fp = GaitBaseLite(spec["channels"], spec["layers"], spec["strides"], (16,), spec["out_channels"], 74)
    bns = [m for m in fp.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None  # cumulative average over the calibration passes
    fp.train()
    with torch.no_grad():
        for chunk in calib.split(2):
            fp(chunk)
    out: Dict[str, nn.Module] = {"fp32": Embeddings(fp).eval()}
    for b in bits:
        # quantizers between layers placed from the dataflow, as the hosts place them
        q = quantize_model(copy.deepcopy(fp), {"weight": {"bits": b}, "act": {"bits": b}}, example_inputs=calib[:1])
        q.train()
        with torch.no_grad():
            for chunk in calib.split(2):
                q(chunk)
        out[f"w{b}a{b}"] = Embeddings(q).eval()
    return out


#: the latency key of the FP32 file run at OpenVINO's default precision (bf16 on CPUs with AVX-512 BF16/AMX)
FP_DEFAULT = "fp_default"


def _label(prec: str, net: Dict[str, Any]) -> str:
    if prec == FP_DEFAULT:
        return f"FP, OpenVINO default ({net.get('openvino_default_precision', '?')})"
    return "FP32 (f32 hint)" if prec == "fp32" else prec.upper()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


def measure_network(name: str, spec: Dict[str, Any], runtimes: Sequence[str], threads: Sequence[int], runs: int,
                    warmup: int, tmp: str, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Export, check and time one network; returns sizes, op counts, agreement and latencies."""
    from ..export.deploy import IO_NAMES
    from ..export.onnx_export import export_float_onnx, export_onnx
    from ..export.packed import save_packed
    from ..export.runtime import (
        latency_stats,
        open_runtime,
        openvino_default_precision,
        optimized_graph_ops,
        time_interleaved,
    )

    x = binary_frames(1, spec["frames"], spec["height"], spec["width"], seed=1)
    calib = binary_frames(4, spec["frames"], spec["height"], spec["width"], seed=2)
    log(f"[bench] {name}: building and calibrating")
    models = build_models(spec, calib)
    names = IO_NAMES
    files: Dict[str, str] = {}
    res: Dict[str, Any] = {"input": [1, spec["frames"], spec["height"], spec["width"]], "spec": {
        k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}, "bytes": {}, "ops": {},
        "optimized_ops": {}, "cosine_vs_torch": {}, "problems": {}, "latency": {}}
    for prec, model in models.items():
        path = os.path.join(tmp, f"{name}_{prec}.onnx")
        log(f"[bench] {name}: exporting {prec}")
        export = export_float_onnx if prec == "fp32" else export_onnx
        info = export(model, (x,), path, **names)
        files[prec] = path
        res["bytes"][prec] = info["bytes"]
        res["ops"][prec] = info["ops"]
        res["optimized_ops"][prec] = optimized_graph_ops(path)
        if prec != "fp32":
            res["problems"][prec] = info["problems"]
            with torch.no_grad():
                ref = model(x)
            got = torch.from_numpy(open_runtime("ort", path, 1).run(x.numpy())[0])
            res["cosine_vs_torch"][prec] = _cosine(got, ref)
    packed = os.path.join(tmp, f"{name}_w4a4.qgpk")
    # what the ONNX files hold: the embedding path (backbone and per-part FC), not the training classifier
    q: Any = models["w4a4"].model
    res["bytes"]["packed_w4a4"] = save_packed(nn.ModuleDict({"Backbone": q.Backbone, "FCs": q.FCs}), packed)
    xs = x.numpy()
    for rt in runtimes:
        for th in threads:
            runners = {p: open_runtime(rt, f, th, fp32=p == "fp32", static_shapes=[xs.shape]) for p, f in files.items()}
            if rt == "openvino":  # the FP baseline of a user who does not quantize: OpenVINO's own precision
                runners[FP_DEFAULT] = open_runtime(rt, files["fp32"], th, fp32=False, static_shapes=[xs.shape])
                res["openvino_default_precision"] = openvino_default_precision()
            log(f"[bench] {name}: timing {rt}, {th} thread(s), {runs} runs each")
            times = time_interleaved({p: functools.partial(r.run, xs) for p, r in runners.items()}, runs, warmup)
            res["latency"][f"{rt}/{th}"] = {p: latency_stats(t) for p, t in times.items()}
    return res


def measure(networks: Sequence[str] = ("demo", "gaitbase"), runtimes: Optional[Sequence[str]] = None,
            threads: Sequence[int] = (1, 2), runs: int = 30, warmup: int = 5, quick: bool = False,
            log: Callable[[str], None] = print, keep: Optional[str] = None) -> Dict[str, Any]:
    """The whole benchmark as a dict (see the module doc); ``quick`` uses one tiny network; ``keep``
    is a folder that keeps the exported files (default: a temporary one)."""
    from ..export.runtime import cpu_info, openvino_available, runtime_versions

    if runtimes is None:
        runtimes = ["ort"] + (["openvino"] if openvino_available() else [])
    specs = {"quick": QUICK_MODEL} if quick else {n: MODELS[n] for n in networks}
    out: Dict[str, Any] = {"cpu": cpu_info(), "versions": runtime_versions(), "runtimes": list(runtimes),
                           "threads": list(threads), "runs": runs, "warmup": warmup, "quick": quick,
                           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                           "networks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        where = keep or tmp
        os.makedirs(where, exist_ok=True)
        for name, spec in specs.items():
            out["networks"][name] = measure_network(name, spec, runtimes, threads, runs, warmup, where, log)
    if hasattr(os, "getloadavg"):
        out["load_average_after"] = list(os.getloadavg())
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_tables(res: Dict[str, Any]) -> str:
    """Markdown: one latency table and one size table per network, and the CPU line."""
    from ..export.runtime import cpu_flags_line

    v = res["versions"]
    lines = [cpu_flags_line(res["cpu"]),
             f"onnxruntime {v.get('onnxruntime')}, OpenVINO {v.get('openvino') or 'not installed'}; "
             f"median of {res['runs']} runs after {res['warmup']} warm-up runs (IQR, min-max in brackets); "
             f"load average before {', '.join(f'{a:.1f}' for a in res['load_average'] or [])}", ""]
    for name, net in res["networks"].items():
        f, h, w = net["input"][1:]
        lines += [f"**{name}** ({'-'.join(map(str, net['spec']['channels']))}, {f} frames of {h} x {w})", "",
                  "| runtime | threads | model | ms / sequence (median) | IQR | min-max | x FP32 speed |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for key, lat in net["latency"].items():
            rt, th = key.split("/")
            base = lat["fp32"]["median_ms"]
            for prec, st in lat.items():
                lines.append(f"| {'OpenVINO' if rt == 'openvino' else 'onnxruntime'} | {th} | {_label(prec, net)} | "
                             f"{st['median_ms']:.1f} | {st['q1_ms']:.1f}-{st['q3_ms']:.1f} | "
                             f"{st['min_ms']:.1f}-{st['max_ms']:.1f} | {base / st['median_ms']:.2f} |")
        b = net["bytes"]
        lines += ["", "| file | bytes | x smaller than FP32 ONNX |", "|---|---:|---:|"]
        for k, label in (("fp32", "FP32 ONNX"), ("w8a8", "W8A8 ONNX (int8)"), ("w4a4", "W4A4 ONNX (int8 containers)"),
                         ("packed_w4a4", "W4A4 packed (.qgpk, 4-bit; backbone + FC)")):
            lines.append(f"| {label} | {b[k]:,} ({_mb(b[k])}) | {b['fp32'] / b[k]:.2f} |")
        cos = ", ".join(f"{k.upper()} {v:.6f}" for k, v in net["cosine_vs_torch"].items())
        lines += ["", f"onnxruntime vs PyTorch (fake-quantized), embedding cosine: {cos}", ""]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--networks", nargs="+", choices=sorted(MODELS), default=["demo", "gaitbase"])
    p.add_argument("--runtimes", nargs="+", choices=["ort", "openvino"], default=None,
                   help="default: onnxruntime, and OpenVINO when installed")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--runs", type=int, default=30, help="timed runs per model (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--out", default="bench_export", help="writes OUT.md and OUT.json (default bench_export)")
    p.add_argument("--force", action="store_true", help="replace OUT.md and OUT.json of an earlier run")
    p.add_argument("--quick", action="store_true", help="one tiny network, 3 runs: checks the path, measures nothing")
    p.add_argument("--keep", default=None, help="keep the exported ONNX and packed files in this folder")


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_writable, write_text_atomic
    from ..errors import ConfigError
    from ..export.outputs import all_or_nothing, check_output_paths

    # checked as given, --quick or not: --quick chooses the sizes, it does not excuse a typo
    if args.runs < 1 or args.warmup < 0 or any(t < 1 for t in args.threads):
        raise ConfigError(f"--runs {args.runs}, --warmup {args.warmup}, --threads {args.threads}: --runs must be "
                          ">= 1, --warmup >= 0 and every --threads >= 1")
    runs, warmup = (3, 1) if args.quick else (args.runs, args.warmup)
    outs = {"--out (.json)": args.out + ".json", "--out (.md)": args.out + ".md"}
    check_output_paths(outs, {}, args.force)
    if args.keep:
        if os.path.exists(args.keep) and not os.path.isdir(args.keep):
            raise ConfigError(f"--keep {args.keep}: is a file; give a folder")
        check_writable(args.keep, "--keep")
    res = measure(args.networks, args.runtimes, args.threads, runs, warmup, quick=args.quick, keep=args.keep)
    md = format_tables(res)
    with all_or_nothing(list(outs.values())):
        write_text_atomic(args.out + ".json", json.dumps(res, indent=2) + "\n")
        write_text_atomic(args.out + ".md", md + "\n")
    print(md)
    print(f"[bench] wrote {args.out}.md and {args.out}.json")
    return 0
