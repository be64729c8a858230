"""``qgait bench ...``: benchmarks that print figures."""
from __future__ import annotations

import argparse


def add_commands(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("bench", help="benchmarks: per-step overhead of quantized training")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from . import overhead

    o = bsub.add_parser("overhead", help="forward+backward time of W8A8/W4A4 (STE, soft) vs FP32")
    overhead.add_arguments(o)
    o.set_defaults(func=overhead.main_args)

    from . import export_speed

    e = bsub.add_parser("export", help="ONNX file size and onnxruntime latency: FP32 vs W8A8/W4A4 integer weights")
    export_speed.add_arguments(e)
    e.set_defaults(func=export_speed.main_args)
