"""``qgait bench overhead|accuracy|tune|export``: benchmarks that print figures (speed goals live here, not in tests).

``overhead``: forward + backward time of W8A8/W4A4 (STE, soft) against FP32. ``export``: ONNX file
size and onnxruntime latency, FP32 against integer-weight models.
"""
from __future__ import annotations

import argparse
import importlib

#: benchmark -> (module, help); each module has add_arguments(parser) and run(args), as commands do
BENCHES = {
    "overhead": ("qgait_plugin.bench.overhead", "forward+backward time of W8A8/W4A4 (STE, soft) vs FP32"),
    "accuracy": ("qgait_plugin.bench.accuracy",
                 "QAT methods (LSQ, QGait, ablations) and PTQ by bit width and seed, paired intervals"),
    "tune": ("qgait_plugin.bench.tune", "search QGait's knobs on the validation subjects (never the test ones)"),
    "export": ("qgait_plugin.bench.export_speed",
               "ONNX file size and onnxruntime latency: FP32 vs W8A8/W4A4 integer weights"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, helptext) in BENCHES.items():
        mod = importlib.import_module(module)
        b = sub.add_parser(name, help=helptext, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(b)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHES[args.bench][0]).run(args))
