"""The ``qgait`` command: one parser, subcommands contributed by the hosts.

Each host module exposes ``add_commands(subparsers)``; heavy imports happen inside the command
functions, so ``qgait --help`` is fast and works without OpenGait.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: modules that add subcommands; a missing module (a trimmed install) just adds none
COMMAND_MODULES = ("qgait_plugin.synth.cli", "qgait_plugin.local.cli", "qgait_plugin.opengait.cli",
                   "qgait_plugin.bench.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qgait",
        description="Quantization-aware training for gait recognition (QGait): soft quantizer, two-phase schedule, "
                    "IDD distillation; a built-in CPU demo and an OpenGait adapter.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"qgait-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        mod.add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
