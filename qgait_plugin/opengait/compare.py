"""``qgait compare FP_RESULT QUANT_RESULT...``: rank-1 (and mAP), delta vs FP, model size and bit widths.

Inputs are the results JSON the launcher writes after a test (``qgait-results/1``: model,
dataset, metrics, size in bytes, bits) or an OpenGait log file; from a log the metrics are read
from OpenGait's own evaluator output (CASIA-B/OUMVLP ``NM@R1: 97.60%`` summary lines, GREW's
``==Rank-1==`` block, Gait3D's result dict) and size/bits are unknown.

Inputs are checked before anything is compared: every metric must be a finite number (not a
boolean, string or list), in percent (a run whose values are all fractions of 1 against one in
percent is refused: its differences would be meaningless), ``size_bytes`` a whole number and
``bits`` two whole numbers; all runs must come from one data set and share a metric with the FP run.
Metrics that cannot be compared (not rank-1/mAP, or missing from the FP run) are listed as skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import QGaitError, short_repr

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
        if not isinstance(d, dict):
            raise CompareError(f"{path}: holds a JSON {type(d).__name__}; expected a {RESULTS_FORMAT!r} object")
        if d.get("format") != RESULTS_FORMAT or not isinstance(d.get("metrics"), dict):
            raise CompareError(f"{path}: format {short_repr(d.get('format'))}; "
                               f"expected {RESULTS_FORMAT!r} with a 'metrics' mapping")
        name = p.stem if p.stem != "qgait_results" else d.get("save_name", p.stem)
        return RunResult(str(name), _check_metrics(path, d["metrics"]), _text(path, d, "model"),
                         _text(path, d, "dataset"), _size_field(path, d.get("size_bytes")),
                         _bits_field(path, d.get("bits")), fp)
    metrics = parse_log(text)
    if not metrics:
        raise CompareError(f"{path}: no OpenGait evaluation output found (rank-1 lines or a test_accuracy dict)")
    return RunResult(p.stem, metrics, fp=fp)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_metrics(path: str, metrics: Dict[str, object]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CompareError(f"{path}: metrics.{k}: {short_repr(v)} ({type(v).__name__}); expected a number "
                               "(rank-1 or mAP in percent)")
        if not math.isfinite(v):
            raise CompareError(f"{path}: metrics.{k}: {v!r}; expected a finite number")
        if not 0 <= v <= 100:
            raise CompareError(f"{path}: metrics.{k}: {v!r} is outside 0..100; expected a percentage")
        out[str(k)] = float(v)
    return out


def _text(path: str, d: Dict[str, object], key: str) -> str:
    v = d.get(key, "?")
    if not isinstance(v, str):
        raise CompareError(f"{path}: {key}: {short_repr(v)} ({type(v).__name__}); expected a name")
    return v


def _size_field(path: str, v: object) -> Optional[int]:
    if v is None:
        return None
    if not _is_int(v) or int(v) <= 0:  # type: ignore[call-overload]
        raise CompareError(f"{path}: size_bytes: {short_repr(v)}; expected a whole number of bytes > 0 (or null)")
    return int(v)  # type: ignore[call-overload]


def _bits_field(path: str, v: object) -> Optional[Dict[str, int]]:
    if v is None:
        return None
    if not isinstance(v, dict) or not all(_is_int(v.get(k)) and 1 <= v[k] <= 32 for k in ("weight", "act")):
        raise CompareError(f"{path}: bits: {short_repr(v)}; expected {{'weight': 1..32, 'act': 1..32}} (or null)")
    return {"weight": int(v["weight"]), "act": int(v["act"])}


def _scale(r: RunResult) -> str:
    """``fraction`` when every compared metric of ``r`` is at most 1, else ``percent``."""
    vals = [v for k, v in r.metrics.items() if _comparable(k)]
    return "fraction" if vals and max(vals) <= 1.0 else "percent"


def _comparable(k: str) -> bool:
    return k.endswith("@R1") or k in ("Rank-1", "mAP")


def check_comparable(fp: RunResult, quant: Sequence[RunResult], paths: Sequence[str]) -> List[str]:
    """Refuse runs that cannot share a table with ``fp``; returns notes on the metrics left out."""
    if not any(_comparable(k) for k in fp.metrics):
        raise CompareError(f"{paths[0]}: has no rank-1 or mAP metric (has {short_repr(sorted(fp.metrics))})")
    scales = {p: _scale(r) for p, r in zip(paths, [fp, *quant])}
    if len(set(scales.values())) > 1:
        frac = [p for p, sc in scales.items() if sc == "fraction"]
        raise CompareError(f"{frac}: every rank-1/mAP value is a fraction of 1 while the other runs give percent; "
                           "write them in percent (x100) so the differences mean something")
    notes: List[str] = []
    for p, r in zip(paths, [fp, *quant]):
        other = sorted(k for k in r.metrics if not _comparable(k))
        if other:
            notes.append(f"{p}: skipped {other} (not rank-1 or mAP)")
    for p, r in zip(paths[1:], quant):
        shared = [k for k in r.metrics if _comparable(k) and k in fp.metrics]
        if not shared:
            raise CompareError(f"{p}: shares no rank-1/mAP metric with the FP run {paths[0]} "
                               f"({short_repr(sorted(r.metrics))} vs {short_repr(sorted(fp.metrics))})")
        missing = sorted(k for k in r.metrics if _comparable(k) and k not in fp.metrics)
        if missing:
            notes.append(f"{p}: {missing} have no FP value to compare with (shown without a difference)")
    return notes


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


def compare_files(fp_path: str, quant_paths: Sequence[str], notes: Optional[List[str]] = None) -> str:
    """The table of :func:`compare_table`; what was left out is appended to ``notes`` when given."""
    fp = load_result(fp_path, fp=True)
    quant = [load_result(p) for p in quant_paths]
    mismatched = [q.name for q in quant if "?" not in (q.dataset, fp.dataset) and q.dataset != fp.dataset]
    if mismatched:
        raise CompareError(f"{mismatched} were evaluated on another data set than the FP run ({fp.dataset})")
    found = check_comparable(fp, quant, [fp_path, *quant_paths])
    if notes is not None:
        notes.extend(found)
    return compare_table(fp, quant)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fp_result", help="FP run: qgait results JSON or OpenGait log file")
    p.add_argument("quant_results", nargs="+", help="quantized runs: results JSONs or OpenGait log files")


def run(args: argparse.Namespace) -> int:
    notes: List[str] = []
    print(compare_files(args.fp_result, args.quant_results, notes))
    for note in notes:
        print(f"qgait compare: {note}", file=sys.stderr)
    return 0
