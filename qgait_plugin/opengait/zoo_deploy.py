"""Integer deployment of OpenGait's zoo at OpenGait's widths: block-registry placement against dataflow placement.

``python -m qgait_plugin.opengait.zoo_deploy [MODEL ...] [--root OPENGAIT_ROOT] [--bits 8] [--runs 10]``
prints, per model, the integer and float ops left in onnxruntime's optimized graph and the int8
vs FP32 latency at 1 thread, for both placements: ``registry`` (``quantize_model`` without example
inputs: layer inputs plus registered residual blocks, what the project did before) and
``dataflow`` (``quantize_model(..., example_inputs=...)``). Each quantized model is calibrated on
binary frames in training mode, as a short QAT run would leave it. A benchmark, not a test: at
full widths it takes minutes per model on a CPU.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import tempfile
from typing import Any, Callable, Dict, List, Sequence

import torch

INTEGER_OPS = ("QLinearConv", "com.microsoft:QLinearConv", "ConvInteger", "com.microsoft:MatMulIntegerToFloat",
               "MatMulInteger", "QLinearMatMul", "com.microsoft:QLinearAdd", "com.microsoft:QLinearConcat",
               "com.microsoft:QLinearLeakyRelu", "com.microsoft:QLinearSigmoid", "com.microsoft:QLinearAveragePool",
               "com.microsoft:QLinearMul", "com.microsoft:QLinearReduceMean", "com.microsoft:QLinearGlobalAveragePool")
FLOAT_HEAVY = ("Conv", "MatMul", "Gemm", "com.microsoft:FusedConv", "com.microsoft:FusedMatMul",
               "com.ms.internal.nhwc:Conv", "com.microsoft.nchwc:Conv")


def summarize_ops(ops: Dict[str, int]) -> Dict[str, Any]:
    """Integer ops, float convs/matmuls left, and every other op, from an optimized graph's op counts."""
    return {"integer": {k: v for k, v in ops.items() if k in INTEGER_OPS},
            "float_heavy": {k: v for k, v in ops.items() if k in FLOAT_HEAVY}}


def measure(og: Any, name: str, bits: int, runs: int, frames: int, tmp: str) -> Dict[str, Any]:
    from ..config import QuantConfig
    from ..export.onnx_export import export_float_onnx, export_onnx
    from ..export.runtime import latency_stats, open_runtime, optimized_graph_ops, time_interleaved
    from ..quant.convert import quantize_model
    from .export import OpenGaitEmbeddings
    from .zoo import ZOO, build_bare, example_inputs

    config, ov, _, h, w = ZOO[name]
    torch.manual_seed(0)
    fp = build_bare(og, config, ov).eval()
    x = (torch.rand(1, frames, h, w, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    fp_path = os.path.join(tmp, f"{name}_fp32.onnx")
    fp_emb = OpenGaitEmbeddings(fp).eval()
    fp_info = export_float_onnx(fp_emb, (x,), fp_path)
    fp_run = open_runtime("ort", fp_path, 1, fp32=True)
    res: Dict[str, Any] = {"model": name, "fp32_bytes": fp_info["bytes"],
                           "fp32_ops": summarize_ops(optimized_graph_ops(fp_path))}
    cfg = QuantConfig.from_dict({"weight": {"bits": bits}, "act": {"bits": bits}})
    for placement, weights in (("registry", "auto"), ("dataflow", "auto"), ("dataflow_int8_weights", "int8")):
        q = copy.deepcopy(fp)
        ex = example_inputs(1, 8, h, w) if placement.startswith("dataflow") else None
        quantize_model(q, cfg, example_inputs=(ex,) if ex is not None else None)
        q.train()
        with torch.no_grad():
            for s in range(2):
                q(example_inputs(2, 8, h, w, seed=10 + s))
        emb = OpenGaitEmbeddings(q).eval()
        path = os.path.join(tmp, f"{name}_{placement}.onnx")
        info = export_onnx(emb, (x,), path, conv_weights=weights)
        run = open_runtime("ort", path, 1)
        with torch.no_grad():
            ref = emb(x)
        got = torch.from_numpy(run.run(x.numpy())[0])
        cos = float(torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min())
        xs = x.numpy()
        fns: Dict[str, Callable[[], Any]] = {"int8": functools.partial(run.run, xs),
                                              "fp32": functools.partial(fp_run.run, xs)}
        times = time_interleaved(fns, runs, 2)
        lat = {k: latency_stats(v)["median_ms"] for k, v in times.items()}
        res[placement] = {"bytes": info["bytes"], "uint8_weights": info["passes"]["uint8_weights"],
                          "problems": len(info["problems"]),
                          "ops": summarize_ops(optimized_graph_ops(path)), "cosine": cos,
                          "int8_ms": lat["int8"], "fp32_ms": lat["fp32"], "speedup": lat["fp32"] / lat["int8"]}
        print(json.dumps({name: {placement: res[placement]}}), flush=True)
    return res


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - a benchmark
    from .env import import_opengait
    from .registry import register
    from .zoo import ZOO

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="*", default=["GaitBase", "DeepGaitV2-2d", "DeepGaitV2-p3d", "GaitSet",
                                                  "GaitPart", "GaitGL", "GLN"])
    ap.add_argument("--root", default=None)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    og = import_opengait(args.root)
    register(og)
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name not in ZOO:
                raise SystemExit(f"unknown model {name!r}; choose from {list(ZOO)}")
            results.append(measure(og, name, args.bits, args.runs, args.frames, tmp))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
