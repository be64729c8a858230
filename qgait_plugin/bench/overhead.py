"""Per-step cost of a converted model against its float original (forward + backward, same batch).

Run: ``qgait bench overhead`` (or ``python -m qgait_plugin.bench.overhead``). Prints a table of
median milliseconds per step for FP, W8A8 and W4A4 under STE and soft rounding, with the quantizers
between layers placed as before (layer inputs and registered blocks) and from the dataflow (``_dataflow``).
"""
from __future__ import annotations

import argparse
import copy
import statistics
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..export.runtime import time_calls
from ..quant.convert import quantize_model, set_rounding


def gait_conv_stack(widths: Sequence[int] = (16, 32, 64), parts: int = 16, embed: int = 64) -> nn.Module:
    """A GaitBase-like per-frame 2D conv stack with a per-part head, for timing only."""
    layers: List[nn.Module] = []
    cin = 1
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                   nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = w
    layers += [nn.AdaptiveAvgPool2d((parts, 1)), nn.Flatten(), nn.Linear(cin * parts, embed)]
    return nn.Sequential(*layers)


def time_steps(model: nn.Module, x: torch.Tensor, steps: int, warmup: int = 3) -> float:
    """Median seconds of forward + backward + SGD step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return statistics.median(time_calls(step, steps, warmup))


def measure(frames: int = 128, height: int = 32, width: int = 22, steps: int = 10, threads: Optional[int] = None,
        device: str = "cpu") -> Dict[str, float]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = (torch.rand(frames, 1, height, width, device=device) > 0.5).float()
    fp = gait_conv_stack().to(device)
    results = {"fp32": time_steps(fp, x, steps)}
    for bits in (8, 4):
        # registry: layer quantizers only on this stack (it has no residual block); dataflow: placed from a
        # run on x, as the hosts place them (a quantizer on every tensor between layers)
        for placement, ex in (("", None), ("_dataflow", x[:1])):
            q = quantize_model(copy.deepcopy(fp), {"weight": {"bits": bits}, "act": {"bits": bits}}, example_inputs=ex)
            for mode in ("ste", "soft"):
                set_rounding(q, mode)
                results[f"w{bits}a{bits}_{mode}{placement}"] = time_steps(q, x, steps)
    return results


def format_table(results: Dict[str, float]) -> str:
    base = results["fp32"]
    lines = ["| model | ms / step | x FP32 |", "|---|---:|---:|"]
    for k, v in results.items():
        lines.append(f"| {k} | {1000 * v:.1f} | {v / base:.2f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=128, help="frames per batch (default 128)")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=22)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    for name in ("frames", "height", "width", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}: {value}; give a positive number")
    res = measure(args.frames, args.height, args.width, args.steps, args.threads, args.device)
    print(f"forward+backward+SGD, {args.frames} frames of {args.height}x{args.width}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    print(format_table(res))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
