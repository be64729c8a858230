"""``qgait export``: a trained built-in-host checkpoint out as a real integer model.

Writes an ONNX file (QDQ graph, integer weights; input ``[n, frames, h, w]`` silhouettes, output
the ``[n, c, parts]`` embeddings the evaluator compares) and a bit-packed checkpoint, checks that
onnxruntime reproduces the PyTorch embeddings on a test sequence, and prints sizes and latency.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Dict

import torch
from torch import nn

from ..errors import ConfigError


class EmbeddingHead(nn.Module):
    """The deployable part of a gait model: silhouettes in, embeddings out (no classifier logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sils: torch.Tensor) -> torch.Tensor:
        return self.model(sils)["embeddings"]


def export_checkpoint(cfg: Dict[str, Any], out: str, packed: str = "", runs: int = 10, progress: bool = False,
                      source: str = "config") -> Dict[str, Any]:
    """Export the checkpoint ``cfg``'s ``evaluator_cfg.restore_hint`` picks (a loaded config dict)."""
    from ..export.onnx_export import export_onnx
    from ..export.packed import save_packed
    from ..export.runtime import cpu_session, run_session, time_session
    from ..quant.size import model_size_bytes
    from .data import load_split
    from .trainer import Trainer

    if runs < 1:
        raise ConfigError(f"--runs: {runs}; the latency needs at least one timed onnxruntime run")
    if cfg.get("quant") is None:
        raise ConfigError(f"{source}: has no quant: section; export writes quantized models (train one with quant:)")
    tr = Trainer(cfg, progress=progress)
    e = cfg["evaluator_cfg"]
    tr.restore(e["restore_hint"], strict=True, save_name=e.get("save_name"), source="evaluator_cfg.restore_hint")
    model = EmbeddingHead(tr.model.cpu()).eval()
    seq = load_split(cfg["data_cfg"], "TEST_SET", progress=False)[0]
    limit = e["sampler"].get("frames_all_limit", 0) or seq.frames.shape[0]
    frames = seq.frames[:limit].float().div(255.0)[None]  # as the evaluator feeds it: [1, frames, h, w] in [0, 1]
    ref = model(frames).detach()
    info = export_onnx(model, (frames,), out, input_names=("silhouettes",), output_names=("embeddings",),
                       dynamic_axes={"silhouettes": {0: "batch", 1: "frames"}, "embeddings": {0: "batch"}})
    sess = cpu_session(out, torch.get_num_threads())
    got = torch.from_numpy(run_session(sess, frames.numpy())[0])
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    times = time_session(sess, frames.numpy(), runs=runs, warmup=0)  # the run above was the warm-up
    res = {"onnx": out, "onnx_bytes": info["bytes"], "integer_weights": info["integer_weights"],
           "max_rel_diff_vs_torch": err, "ort_ms_per_sequence": 1000 * statistics.median(times),
           "frames": int(frames.shape[1]), "model_size_bytes": model_size_bytes(tr.model)}
    if packed:
        res["packed"] = packed
        res["packed_bytes"] = save_packed(tr.model, packed)
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfgs", required=True,
                   help="the QAT config the checkpoint was trained with (evaluator_cfg.restore_hint picks it)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--packed", default="", help="also write a bit-packed checkpoint here")
    p.add_argument("--runs", type=int, default=10, help="onnxruntime timing runs")


def run(args: argparse.Namespace) -> int:
    from .config import load_config

    res = export_checkpoint(load_config(args.cfgs), args.out, args.packed, args.runs, source=args.cfgs)
    print(f"ONNX (integer weights: {res['integer_weights']} layers): {res['onnx']}  {res['onnx_bytes']:,} bytes")
    if "packed" in res:
        print(f"packed checkpoint: {res['packed']}  {res['packed_bytes']:,} bytes")
    print(f"model size at stored bit widths: {res['model_size_bytes']:,} bytes")
    print(f"onnxruntime vs PyTorch embeddings: max relative difference {res['max_rel_diff_vs_torch']:.2e}")
    print(f"onnxruntime: {res['ort_ms_per_sequence']:.1f} ms per sequence of {res['frames']} frames "
          f"({torch.get_num_threads()} threads)")
    return 0
