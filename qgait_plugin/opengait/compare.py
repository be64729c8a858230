"""``qgait compare FP_RESULT QUANT_RESULT...``: rank-1 (and mAP), delta vs FP, model size and bit widths.

Inputs are the results JSON the launcher writes after a test (``qgait-results/1``: model,
dataset, metrics, size in bytes, bits) or an OpenGait log file; from a log the metrics are read
from OpenGait's own evaluator output (CASIA-B/OUMVLP ``NM@R1: 97.60%`` summary lines, GREW's
``==Rank-1==`` block, Gait3D's result dict) and size/bits are unknown.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import QGaitError

RESULTS_FORMAT = "qgait-results/1"


class CompareError(QGaitError, ValueError):
    """A result file that cannot be read or compared."""


@dataclass
class RunResult:
    name: str
    metrics: Dict[str, float]
    model: str = "?"
    dataset: str = "?"
    size_bytes: Optional[int] = None
    bits: Optional[Dict[str, int]] = field(default=None)
    fp: bool = False

    @property
    def bits_label(self) -> str:
        if self.bits:
            return f"W{self.bits['weight']}A{self.bits['act']}"
        return "FP32" if self.fp else "?"


def parse_log(text: str) -> Dict[str, float]:
    """Metrics from OpenGait log text; the last evaluation in the log wins."""
    metrics: Dict[str, float] = {}
    summaries = re.findall(r"^.*?((?:[\w-]+@R1: [\d.]+%\s*)+)$", text, flags=re.M)
    if summaries:
        metrics.update({k: float(v) for k, v in re.findall(r"([\w-]+@R1): ([\d.]+)%", summaries[-1])})
    for k, v in re.findall(r"'scalar/test_accuracy/([\w-]+)': (?:np\.float\d+\()?([\d.]+)", text):
        metrics[k] = float(v)
    block = re.findall(r"==Rank-1==\s*\n[^\n]*?([\d.]+)\s*$", text, flags=re.M)
    if block:
        metrics["Rank-1"] = float(block[-1])
    return metrics


def load_result(path: str, fp: bool = False) -> RunResult:
    p = Path(path)
    if not p.is_file():
        raise CompareError(f"{path}: no such file (expected a qgait results JSON or an OpenGait log)")
    text = p.read_text(errors="replace")
    if p.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CompareError(f"{path}: not valid JSON ({e})") from None
        if d.get("format") != RESULTS_FORMAT or not isinstance(d.get("metrics"), dict):
            raise CompareError(f"{path}: format {d.get('format')!r}; "
                               f"expected {RESULTS_FORMAT!r} with a 'metrics' mapping")
        return RunResult(p.stem if p.stem != "qgait_results" else d.get("save_name", p.stem), dict(d["metrics"]),
                         d.get("model", "?"), d.get("dataset", "?"), d.get("size_bytes"), d.get("bits"), fp)
    metrics = parse_log(text)
    if not metrics:
        raise CompareError(f"{path}: no OpenGait evaluation output found (rank-1 lines or a test_accuracy dict)")
    return RunResult(p.stem, metrics, fp=fp)


def _columns(results: Sequence[RunResult]) -> List[str]:
    """Rank-1 columns in the FP run's order, then mAP when given."""
    cols: List[str] = []
    for r in results:
        for k in r.metrics:
            if (k.endswith("@R1") or k == "Rank-1") and k not in cols:
                cols.append(k)
    if any("mAP" in r.metrics for r in results):
        cols.append("mAP")
    return cols


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def compare_table(fp: RunResult, quant: Sequence[RunResult]) -> str:
    """A Markdown table: one row per run, each metric with its delta against the FP run."""
    runs = [fp] + list(quant)
    cols = _columns(runs)
    if not cols:
        raise CompareError("no rank-1 or mAP metric in the given results")
    head = ["run", "model", "dataset", "bits", "size", "size vs FP"] + [c.replace("@R1", " R1") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for r in runs:
        ratio = "-"
        if r is not fp and fp.size_bytes and r.size_bytes:
            ratio = f"{fp.size_bytes / r.size_bytes:.1f}x smaller"
        cells = [r.name + (" (FP)" if r is fp else ""), r.model, r.dataset, r.bits_label, _size(r.size_bytes), ratio]
        for c in cols:
            v = r.metrics.get(c)
            if v is None:
                cells.append("-")
            elif r is fp or c not in fp.metrics:
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v:.2f} ({v - fp.metrics[c]:+.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_files(fp_path: str, quant_paths: Sequence[str]) -> str:
    fp = load_result(fp_path, fp=True)
    quant = [load_result(p) for p in quant_paths]
    mismatched = [q.name for q in quant if "?" not in (q.dataset, fp.dataset) and q.dataset != fp.dataset]
    if mismatched:
        raise CompareError(f"{mismatched} were evaluated on another data set than the FP run ({fp.dataset})")
    return compare_table(fp, quant)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fp_result", help="FP run: qgait results JSON or OpenGait log file")
    p.add_argument("quant_results", nargs="+", help="quantized runs: results JSONs or OpenGait log files")


def run(args: argparse.Namespace) -> int:
    print(compare_files(args.fp_result, args.quant_results))
    return 0
