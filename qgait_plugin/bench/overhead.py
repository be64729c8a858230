"""Per-step cost of a converted model against its float original (forward + backward, same batch).

Run: ``qgait bench overhead`` (or ``python -m qgait_plugin.bench.overhead``). Prints a table of
median milliseconds per step for FP, W8A8 and W4A4 under STE and soft rounding, with the quantizers
between layers placed as before (layer inputs and registered blocks) and from the dataflow (``_dataflow``),
every model timed in the same rounds, and each dataflow model's step time over the registry one's, paired
round by round (the figure the QAT step-cost goal of the dataflow placement is read from).
"""
from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..export.runtime import time_interleaved
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


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        return sum(t.square().mean() for t in out.values())
    return out.square().mean()


def train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward + backward + SGD step of ``model`` on ``x``, as a function to time."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        loss = _loss(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


#: the networks ``qgait bench overhead --network`` times
NETWORKS = ("stack", "demo")


def _network(name: str, frames: int, height: int, width: int, device: str) -> Tuple[nn.Module, torch.Tensor]:
    """The float network and one batch of binary silhouettes: ``stack`` (a plain conv stack with max
    pooling, no residual block) or ``demo`` (the built-in GaitBaseLite with its residual blocks,
    16-frame sequences, temporal max)."""
    if name == "stack":
        return gait_conv_stack().to(device), (torch.rand(frames, 1, height, width, device=device) > 0.5).float()
    from ..local.model import GaitBaseLite, register_quant_handlers

    register_quant_handlers()  # the block registry's placement needs BasicBlock registered
    seqs = max(1, frames // 16)
    return GaitBaseLite().to(device), (torch.rand(seqs, 16, height, width, device=device) > 0.5).float()


def measure(frames: int = 128, height: int = 32, width: int = 22, steps: int = 10, threads: Optional[int] = None,
            device: str = "cpu", network: str = "stack") -> Dict[str, float]:
    """Median seconds per training step of the float network and of its quantized versions, timed
    interleaved (one step of each per round, so drift in the machine's speed reaches all alike), and
    for each dataflow-placed version the median over rounds of its step time over the registry one's
    (``<name>_vs_registry``)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    fp, x = _network(network, frames, height, width, device)
    steps_by_name: Dict[str, Callable[[], None]] = {"fp32": train_step(fp, x)}
    for bits in (8, 4):
        # registry: layer quantizers and registered residual blocks; dataflow: placed from a run on one
        # sample, as the hosts place them (a quantizer on every tensor an integer graph needs quantized)
        for placement, ex in (("", None), ("_dataflow", x[:1])):
            for mode in ("ste", "soft"):
                m = quantize_model(copy.deepcopy(fp), {"weight": {"bits": bits}, "act": {"bits": bits}},
                                   example_inputs=ex)
                set_rounding(m, mode)
                steps_by_name[f"w{bits}a{bits}_{mode}{placement}"] = train_step(m, x)
    times = time_interleaved(steps_by_name, steps, warmup=3)
    results = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        if k.endswith("_dataflow"):
            reg = times[k[: -len("_dataflow")]]
            results[f"{k}_vs_registry"] = statistics.median(a / b for a, b in zip(v, reg))
    return results


def format_table(results: Dict[str, float]) -> str:
    base = results["fp32"]
    lines = ["| model | ms / step | x FP32 | x registry (paired) |", "|---|---:|---:|---:|"]
    for k, v in results.items():
        if k.endswith("_vs_registry"):
            continue
        paired = results.get(f"{k}_vs_registry")
        lines.append(f"| {k} | {1000 * v:.1f} | {v / base:.2f} | {'' if paired is None else f'{paired:.2f}'} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=128, help="frames per batch (default 128)")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=22)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--network", choices=NETWORKS, default="stack",
                   help="stack: conv stack with max pooling; demo: the built-in GaitBaseLite (residual blocks)")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    for name in ("frames", "height", "width", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}: {value}; give a positive number")
    res = measure(args.frames, args.height, args.width, args.steps, args.threads, args.device, args.network)
    print(f"{args.network}: forward+backward+SGD, {args.frames} frames of {args.height}x{args.width}, "
          f"{torch.get_num_threads()} threads, device {args.device}, {args.steps} rounds interleaved")
    print(format_table(res))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
