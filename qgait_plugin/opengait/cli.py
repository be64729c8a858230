"""``qgait opengait train|test|export|calibrate``: OpenGait's own training or test loop with the QGait plugin
registered, a QAT checkpoint out as an integer ONNX model, or an FP checkpoint calibrated into a quantized one
(post-training quantization, :mod:`qgait_plugin.opengait.calibrate`).

The config is an OpenGait config (with a ``quant:`` section for QAT). ``--device cuda`` runs as
OpenGait does (NCCL, one process per GPU, e.g. under torchrun); ``--device cpu`` runs on gloo with
OpenGait's CUDA calls redirected at run time. After a test the results JSON that ``qgait compare``
reads is written. ``export`` builds the model without OpenGait's loaders (CPU), loads the
checkpoint ``evaluator_cfg`` names and writes ``--out`` (and ``--packed``); see
:mod:`qgait_plugin.opengait.export`.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("phase", choices=["train", "test", "export", "calibrate"])
    p.add_argument("--root", default=None, help="OpenGait checkout (default: $OPENGAIT_ROOT)")
    p.add_argument("--cfgs", required=True, help="OpenGait config YAML (with a quant: section for QAT)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda",
                   help="cuda: NCCL, one process per GPU (as OpenGait); cpu: gloo, CUDA calls redirected")
    p.add_argument("--iter", type=int, default=0, help="restore this iteration (sets both restore_hints)")
    p.add_argument("--log_to_file", action="store_true", help="also log to output/.../logs (OpenGait's option)")
    p.add_argument("--workdir", default=None, help="where output/ goes (default: the checkout root)")
    p.add_argument("--cpu-overrides", action="store_true",
                   help="with --device cpu, set the config keys a CPU run needs instead of stopping")
    p.add_argument("--results", default=None,
                   help="results JSON path (default output/<dataset>/<model>/<save_name>/qgait_results.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="train: a fresh run may replace the checkpoints of an earlier run under the same save_name; "
                        "calibrate: replace an earlier calibration's checkpoint")
    # what `python -m torch.distributed.launch` passes (--local_rank; --local-rank on torch 2), as
    # OpenGait's own main.py accepts both
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch (same as the LOCAL_RANK variable)")
    p.add_argument("--dump-quantizers", default=None, help=argparse.SUPPRESS)  # '{rank}' in the path: one file per rank
    p.add_argument("--no-plugin", action="store_true", help=argparse.SUPPRESS)  # plain OpenGait, for comparisons
    e = p.add_argument_group("export")
    e.add_argument("--out", default="", help="export: the ONNX file to write (integer graph)")
    e.add_argument("--packed", default="", help="export: also write a bit-packed checkpoint here")
    e.add_argument("--force", action="store_true", help="export: overwrite existing output files")
    e.add_argument("--runtime", choices=["ort", "openvino"], default="ort", help="export: runtime for check and timing")
    e.add_argument("--threads", type=int, default=1, help="export: runtime threads (default 1)")
    e.add_argument("--runs", type=int, default=10, help="export: timed runs of each file (0: no timing)")
    e.add_argument("--check", type=int, default=4, help="export: test sequences for the agreement check")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "local_rank", None) is not None:
        import os

        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if args.phase == "calibrate":
        from .calibrate import run as calibrate

        return calibrate(args)
    if args.phase == "export":
        from ..export.deploy import print_summary
        from .export import export_opengait

        res = export_opengait(args.cfgs, args.out, root=args.root, packed=args.packed, force=args.force,
                              runtime=args.runtime, threads=args.threads, runs=args.runs, iteration=args.iter,
                              workdir=args.workdir, checks=args.check)
        print_summary(res)
        return 0
    from .launcher import run as launch

    return launch(args.phase, args.root, args.cfgs, device=args.device, iteration=args.iter,
                  log_to_file=args.log_to_file, workdir=args.workdir, cpu_overrides=args.cpu_overrides,
                  results=args.results, dump_quantizers=args.dump_quantizers, plugin=not args.no_plugin,
                  overwrite=args.overwrite)
