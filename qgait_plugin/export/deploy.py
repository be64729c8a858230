"""One export with its evidence: the integer ONNX file, the FP32 file it is compared with, agreement and speed.

What ``qgait export``, ``qgait opengait export`` and the demo's deployment step share: export a
quantized embedding model (silhouettes in, embeddings out) as the integer graph, export the float
version of the same network (quantizers removed) for comparison, check that the runtime
reproduces the fake-quantized PyTorch model on given sequences (cosine per sequence), and time
both files in the same runtime, interleaved run by run.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..quant.convert import dequantize_model

#: names and dynamic axes of a deployed gait model: ``[n, frames, h, w]`` silhouettes -> ``[n, c, parts]``
IO_NAMES: Dict[str, Any] = {"input_names": ("silhouettes",), "output_names": ("embeddings",),
                            "dynamic_axes": {"silhouettes": {0: "batch", 1: "frames"}, "embeddings": {0: "batch"}}}


def float_copy(model: nn.Module) -> nn.Module:
    """The same network with every quantizer removed (the FP32 model an integer one is compared with)."""
    return dequantize_model(copy.deepcopy(model)).eval()


def cosines(runner: Any, model: nn.Module, sequences: Sequence[torch.Tensor]) -> List[float]:
    """Cosine between the runtime's and PyTorch's embeddings, one per sequence (each ``[1, s, h, w]``)."""
    out = []
    with torch.no_grad():
        for x in sequences:
            ref = model(x).flatten(1)
            got = torch.from_numpy(runner.run(x.numpy())[0]).flatten(1)
            out.append(float(torch.nn.functional.cosine_similarity(got, ref).min()))
    return out


def export_and_check(model: nn.Module, example: torch.Tensor, out: str, checks: Sequence[torch.Tensor] = (),
                     runtime: str = "ort", threads: int = 1, runs: int = 10, warmup: int = 2,
                     fp32_out: Optional[str] = None, float_model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Export ``model`` (quantized, initialised, silhouettes -> embeddings) to ``out`` and measure it.

    ``checks``: sequences for the agreement check (default: ``example``). The FP32 comparison file
    goes to ``fp32_out`` (default: a temporary file) from ``float_model`` (default: ``model`` with
    its quantizers removed). ``runs = 0`` skips the timing. Returns sizes, op counts (file and
    onnxruntime's optimized graph), incomplete integer patterns, cosines and latencies.
    """
    from .float_ops import float_ops
    from .onnx_export import export_float_onnx, export_onnx
    from .passes import op_counts
    from .runtime import latency_stats, open_runtime, optimized_graph, optimized_graph_ops, time_interleaved

    model = model.eval()
    info = export_onnx(model, (example,), out, **IO_NAMES)
    graph = optimized_graph(out)
    res: Dict[str, Any] = {"onnx": out, "onnx_bytes": info["bytes"], "integer_weights": info["integer_weights"],
                           "ops": info["ops"], "problems": info["problems"], "optimized_ops": op_counts(graph.node),
                           "float_ops": float_ops(graph), "runtime": runtime, "threads": threads}
    runner = open_runtime(runtime, out, threads)
    cos = cosines(runner, model, list(checks) or [example])
    res.update(cosines=cos, cosine_min=min(cos))
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = fp32_out or os.path.join(tmp, "fp32.onnx")
        fp_info = export_float_onnx(float_model if float_model is not None else float_copy(model), (example,),
                                    fp_path, **IO_NAMES)
        res.update(fp32_bytes=fp_info["bytes"], fp32_optimized_ops=optimized_graph_ops(fp_path))
        if fp32_out:
            res["fp32_onnx"] = fp32_out
        if runs > 0:
            x = example.numpy()
            fp_runner = open_runtime(runtime, fp_path, threads, fp32=True)
            times = time_interleaved({"int8": lambda: runner.run(x), "fp32": lambda: fp_runner.run(x)}, runs, warmup)
            res["latency"] = {k: latency_stats(v) for k, v in times.items()}
            res["speedup"] = res["latency"]["fp32"]["median_ms"] / res["latency"]["int8"]["median_ms"]
    return res


def print_summary(res: Dict[str, Any]) -> None:
    """The lines both export commands print."""
    from .float_ops import float_ops_line

    print(f"ONNX (integer graph, {res['integer_weights']} int8 weight tensors): {res['onnx']}  "
          f"{res['onnx_bytes']:,} bytes ({res['fp32_bytes'] / res['onnx_bytes']:.2f}x smaller than FP32 ONNX "
          f"{res['fp32_bytes']:,})")
    if "packed" in res:
        print(f"packed checkpoint: {res['packed']}  {res['packed_bytes']:,} bytes")
    opt = res["optimized_ops"]
    integer = {k: v for k, v in opt.items() if "QLinear" in k or "Integer" in k}
    floats = {k: v for k, v in opt.items() if k.split(":")[-1] in ("Conv", "MatMul", "Gemm")}
    print(f"onnxruntime's optimized graph: {integer or 'no integer op'}; float Conv/MatMul left: {floats or 'none'}")
    if "float_ops" in res:
        print(f"stays float: {float_ops_line(res['float_ops'])}")
    if res["problems"]:
        print(f"incomplete integer patterns ({len(res['problems'])}): " + "; ".join(res["problems"][:5]))
    rt = "OpenVINO" if res["runtime"] == "openvino" else "onnxruntime"
    n = res.get("checked_sequences", len(res["cosines"]))
    print(f"{rt} vs PyTorch (fake-quantized) embeddings: cosine min {res['cosine_min']:.6f} over {n} sequence(s)")
    if "latency" in res:
        lat = res["latency"]
        print(f"{rt}, {res['threads']} thread(s), sequence of {res.get('frames', '?')} frames: "
              f"int8 {lat['int8']['median_ms']:.1f} ms, FP32 {lat['fp32']['median_ms']:.1f} ms "
              f"(median of {lat['int8']['runs']}): {res['speedup']:.2f}x")
