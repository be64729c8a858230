"""The demo's last step: its models exported as integer ONNX graphs, with size, speed and agreement.

For every model the demo trained (read back from its checkpoint), :func:`deploy_demo` writes
``<out>/deploy/<method>.onnx`` (the FP model as a float graph, the quantized ones as integer
graphs) and a packed file for the quantized ones, measures onnxruntime's latency against the
FP32 export on this machine (interleaved runs, the trainer's thread count), the embedding cosine
against the fake-quantized PyTorch model, and the rank-1 of the runtime's embeddings on the test
set next to PyTorch's. It prints a table and writes ``deploy.md`` / ``deploy.json``.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..atomic import write_atomic


def runtime_embeddings(runner: Any, seqs: Sequence[Any], frames_limit: int = 0) -> torch.Tensor:
    """Embeddings ``[N, c, p]`` of every sequence from a compiled model (one sequence per call)."""
    out: List[torch.Tensor] = []
    for s in seqs:
        clip = s.frames[:frames_limit] if frames_limit else s.frames
        x = clip.float().div(255.0)[None].numpy()
        out.append(torch.from_numpy(runner.run(x)[0])[0])
    return torch.stack(out)


def runtime_rank1(path: str, cfg: Dict[str, Any], seqs: Sequence[Any], threads: int = 1,
                  runtime: str = "ort") -> Dict[str, Any]:
    """The CASIA-B protocol on the runtime's embeddings of ``seqs`` (the test set)."""
    from ..export.runtime import open_runtime
    from ..protocol import casia_b_protocol

    e = cfg["evaluator_cfg"]
    emb = runtime_embeddings(open_runtime(runtime, path, threads), seqs, e["sampler"].get("frames_all_limit", 0))
    return casia_b_protocol(emb, [s.sid for s in seqs], [s.type for s in seqs], [s.view for s in seqs],
                            metric=e["metric"])


def _demo_config(config: str, out: Path) -> Dict[str, Any]:
    from .config import load_config

    data = out / "data"
    return load_config(config, overrides={
        "data_cfg": {"dataset_root": str(data), "dataset_partition": str(data / "partition.json")},
        "trainer_cfg": {"output_root": str(out / "output")}})


def deploy_demo(out: str | os.PathLike, results: Dict[str, Dict[str, Any]], quick: bool = False,
                runs: Optional[int] = None, progress: bool = False) -> Dict[str, Any]:
    """Export and measure every model of a finished demo in ``out``; returns ``{method: figures}``.

    ``results`` is the demo's results dict (each entry names its ``config``); the checkpoints are
    the latest of each config's ``save_name`` under ``<out>/output``.
    """
    from ..export.deploy import IO_NAMES, export_and_check
    from ..export.onnx_export import export_float_onnx
    from ..export.packed import save_packed
    from ..export.runtime import latency_stats, open_runtime, time_interleaved
    from .data import load_split
    from .export_cmd import EmbeddingHead
    from .trainer import Trainer

    out_p = Path(out)
    dep = out_p / "deploy"
    runs = runs if runs is not None else (3 if quick else 20)
    threads = torch.get_num_threads()
    report: Dict[str, Any] = {}
    test: Optional[List[Any]] = None
    fp_path = str(dep / "fp.onnx")
    for name, r in results.items():
        cfg = _demo_config(r["config"], out_p)
        tr = Trainer(cfg, progress=False)
        tr.restore(0, strict=True, save_name=cfg["trainer_cfg"]["save_name"], source="demo checkpoint")
        model = EmbeddingHead(tr.model.cpu()).eval()
        if test is None:
            test = load_split(cfg["data_cfg"], "TEST_SET", progress=progress)
        limit = cfg["evaluator_cfg"]["sampler"].get("frames_all_limit", 0)
        example = test[0].frames[: limit or None].float().div(255.0)[None]
        print(f"[demo] deploy {name} ...", flush=True)
        if cfg.get("quant") is None:
            info = export_float_onnx(model, (example,), fp_path, **IO_NAMES)
            runner = open_runtime("ort", fp_path, threads, fp32=True)
            timed = time_interleaved({"fp32": functools.partial(runner.run, example.numpy())}, runs, 2)
            lat = latency_stats(timed["fp32"])
            entry: Dict[str, Any] = {"onnx": fp_path, "onnx_bytes": info["bytes"], "fp32_bytes": info["bytes"],
                                     "latency": {"fp32": lat, "int8": lat}, "speedup": 1.0, "cosine_min": 1.0}
            path = fp_path
        else:
            path = str(dep / f"{name}.onnx")
            entry = export_and_check(model, example, path, checks=[example], threads=threads, runs=runs)
            entry["packed_bytes"] = save_packed(tr.model, str(dep / f"{name}.qgpk"))
        ev = runtime_rank1(path, cfg, test, threads)
        entry["rank1_runtime"] = {k: round(v, 2) for k, v in ev["rank1"].items()}
        entry["rank1_torch"] = r["rank1"]
        report[name] = entry
    md = format_deploy_table(report, threads)
    print("\n" + md + "\n")
    _write_text(dep / "deploy.json", json.dumps(report, indent=2) + "\n")
    _write_text(dep / "deploy.md", md + "\n")
    return report


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    write_atomic(str(path), write)


#: below this FP32 latency (ms a sequence) a network is too small for its speed ratio to mean much:
#: per-op overhead and timer noise are a large share of it
SMALL_NETWORK_MS = 10.0


def format_deploy_table(report: Dict[str, Any], threads: int) -> str:
    """Markdown: per method, file sizes, the int8 and FP32 latency of the same network (timed
    interleaved in one loop, so the ratio is the columns'), agreement and rank-1."""
    from ..export.runtime import cpu_flags_line

    lines = [f"Deployed (onnxruntime, {threads} thread(s), one sequence; {cpu_flags_line()})", "",
             "| method | ONNX bytes | packed bytes | int8 ms | FP32 ms (same network) | x FP32 speed | "
             "cosine vs PyTorch | rank-1 mean PyTorch / onnxruntime |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    fp_ms = []
    for name, e in report.items():
        lat = e["latency"]
        quantized = "packed_bytes" in e
        int8 = f"{lat['int8']['median_ms']:.2f}" if quantized else "-"
        fp_ms.append(lat["fp32"]["median_ms"])
        speed = f"{e['speedup']:.2f}" if quantized else "1.00"
        packed = f"{e['packed_bytes']:,}" if quantized else "-"
        lines.append(f"| {name} | {e['onnx_bytes']:,} | {packed} | {int8} | {lat['fp32']['median_ms']:.2f} | {speed} | "
                     f"{e['cosine_min']:.6f} | {e['rank1_torch'].get('mean', float('nan')):.1f} / "
                     f"{e['rank1_runtime'].get('mean', float('nan')):.1f} |")
    if fp_ms and max(fp_ms) < SMALL_NETWORK_MS:
        lines += ["", f"These networks take under {SMALL_NETWORK_MS:g} ms a sequence in FP32: too small for the speed "
                      "ratio to mean much (per-op overhead and timer noise are a large share of it). "
                      "`qgait bench export` times GaitBase-size networks."]
    return "\n".join(lines)
