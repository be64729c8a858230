"""``qgait export``: a trained built-in-host QAT checkpoint out as an integer ONNX model (+ packed file).

Writes the integer graph (input ``[n, frames, h, w]`` silhouettes, output the ``[n, c, parts]``
embeddings the evaluator compares; BatchNorm folded, int32 biases, integer convs, adds and per-part
FC), optionally a bit-packed checkpoint, and prints sizes, the agreement with the fake-quantized
PyTorch model (embedding cosine, the minimum over the test sequences checked) and the latency
against an FP32 export of the same network in the chosen runtime.

Refused before anything is read or written: an output that is a folder, that is the checkpoint
being read or the other output, an existing file without ``--force``, one that cannot be written,
and a checkpoint that does not fit the config (other model, other bits). When a step fails after
the ONNX file is written (the packed file, say), the new files are removed again.
"""
from __future__ import annotations

import argparse
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
                      source: str = "config", force: bool = False, runtime: str = "ort", threads: int = 0,
                      checks: int = 8) -> Dict[str, Any]:
    """Export the checkpoint ``cfg``'s ``evaluator_cfg.restore_hint`` picks (a loaded config dict)."""
    from ..export.deploy import export_and_check
    from ..export.outputs import all_or_nothing, check_output_paths
    from ..export.packed import save_packed
    from ..export.runtime import RUNTIMES
    from ..quant.size import model_size_bytes
    from .data import load_split
    from .trainer import Trainer

    if runs < 0:
        raise ConfigError(f"--runs: {runs}; give 0 (no timing) or more timed runs")
    if checks < 1:
        raise ConfigError(f"--check: {checks}; the agreement check needs at least one test sequence")
    if threads < 0:
        raise ConfigError(f"--threads: {threads}; give a positive number of threads, or 0 for torch's count")
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime: {runtime!r} is not a runtime; choose one of {list(RUNTIMES)}")
    if cfg.get("quant") is None:
        raise ConfigError(f"{source}: has no quant: section; export writes quantized models (train one with quant:)")
    tr = Trainer(cfg, progress=progress)
    e = cfg["evaluator_cfg"]
    ckpt = tr.resolve(e["restore_hint"], save_name=e.get("save_name"), source="evaluator_cfg.restore_hint")
    check_output_paths({"--out": out, "--packed": packed}, {"checkpoint": ckpt, "config": source}, force)
    tr.restore(ckpt, strict=True, source="evaluator_cfg.restore_hint")
    model = EmbeddingHead(tr.model.cpu()).eval()
    test = load_split(cfg["data_cfg"], "TEST_SET", progress=False)
    limit = e["sampler"].get("frames_all_limit", 0)
    # as the evaluator feeds them: [1, frames, h, w] in [0, 1] (uint8 / 255, exact in the graph's uint8 input)
    seqs = [s.frames[: limit or s.frames.shape[0]].float().div(255.0)[None] for s in test[:checks]]
    with all_or_nothing([out, packed]):  # a failed --packed takes the new ONNX file with it
        res = export_and_check(model, seqs[0], out, checks=seqs, runtime=runtime,
                               threads=threads or torch.get_num_threads(), runs=runs)
        res.update(frames=int(seqs[0].shape[1]), checked_sequences=len(seqs), checkpoint=ckpt,
                   model_size_bytes=model_size_bytes(tr.model))
        if packed:
            res["packed"] = packed
            res["packed_bytes"] = save_packed(tr.model, packed)
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfgs", required=True,
                   help="the QAT config the checkpoint was trained with (evaluator_cfg.restore_hint picks it)")
    p.add_argument("--out", required=True, help="ONNX file to write (the integer graph)")
    p.add_argument("--packed", default="", help="also write a bit-packed checkpoint here (e.g. model.qgpk)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--runtime", choices=["ort", "openvino"], default="ort",
                   help="runtime for the agreement check and the timing (default onnxruntime)")
    p.add_argument("--threads", type=int, default=0, help="runtime threads (default: torch's thread count)")
    p.add_argument("--runs", type=int, default=10, help="timed runs of each file (default 10)")
    p.add_argument("--check", type=int, default=8, help="test sequences for the agreement check (default 8)")


def run(args: argparse.Namespace) -> int:
    from .config import load_config

    if args.runs < 1:
        raise ConfigError(f"--runs: {args.runs}; the latency against FP32 needs at least one timed run")

    res = export_checkpoint(load_config(args.cfgs), args.out, args.packed, args.runs, source=args.cfgs,
                            force=args.force, runtime=args.runtime, threads=args.threads, checks=args.check)
    from ..export.deploy import print_summary

    print_summary(res)
    print(f"model size at stored bit widths: {res['model_size_bytes']:,} bytes")
    return 0
