"""Size and onnxruntime latency of exported models: FP32 against W8A8 and W4A4 with integer weights.

Run: ``qgait bench export``. On a CPU without VNNI/AMX (like the AVX2 machines this project is
built on) int8 kernels run at about FP32 speed; the size gain holds everywhere.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from typing import Dict

import torch

from ..quant.convert import quantize_model
from .overhead import gait_conv_stack


def _latency_ms(path: str, x: torch.Tensor, runs: int, threads: int) -> float:
    from ..export.runtime import cpu_session, time_session

    return 1000 * statistics.median(time_session(cpu_session(path, threads), x.numpy(), runs=runs))


def measure(frames: int = 64, height: int = 64, width: int = 44, runs: int = 20,
            threads: int = 2) -> Dict[str, Dict[str, float]]:
    from ..export.onnx_export import export_onnx

    torch.manual_seed(0)
    x = (torch.rand(frames, 1, height, width) > 0.5).float()
    fp = gait_conv_stack(widths=(32, 64, 128)).eval()
    out: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fp32.onnx")
        torch.onnx.export(fp, (x,), path, dynamo=False, opset_version=17, input_names=["input"])
        out["fp32"] = {"bytes": os.path.getsize(path), "ms": _latency_ms(path, x, runs, threads)}
        for bits in (8, 4):
            q = quantize_model(copy.deepcopy(fp), {"weight": {"bits": bits}, "act": {"bits": bits}})
            q.train()(x[:16])
            path = os.path.join(tmp, f"w{bits}a{bits}.onnx")
            info = export_onnx(q, (x,), path)
            out[f"w{bits}a{bits}"] = {"bytes": info["bytes"], "ms": _latency_ms(path, x, runs, threads)}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=44)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    res = measure(args.frames, args.height, args.width, args.runs, args.threads)
    base = res["fp32"]
    print(f"onnxruntime CPU, {args.threads} threads, {args.frames} frames of {args.height}x{args.width}")
    print("| model | file bytes | x FP32 size | ms / batch | x FP32 time |\n|---|---:|---:|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {v['bytes']:,} | {v['bytes'] / base['bytes']:.2f} | {v['ms']:.1f} | "
              f"{v['ms'] / base['ms']:.2f} |")
    print("(sub-8-bit grids are stored in 8-bit containers in ONNX; see `model_size_bytes` for packed sizes)")
    return 0
