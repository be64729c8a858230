"""Steps from statistics: weight steps from the weights, activation steps from a whole calibration set.

One pass of the calibration batches through the model with every quantizer switched off (the FP
network, as TensorRT, onnxruntime's ``quantize_static`` and NNCF calibrate) records, per activation
quantizer, the largest ``|x|``, whether any value was negative, and an evenly strided sample of
its inputs from *every* batch (not only the first, which is what QAT's lazy initialisation sees).
An estimator turns those into a step:

* ``minmax``: the largest ``|x|`` maps to the grid's top (no clipping; outliers widen the step);
* ``percentile``: the given percentile of ``|x|`` maps to the top (clips the tail);
* ``mse``: the clip ratio of the largest ``|x|`` that minimises the quantization error over the
  sample (the quantizer's own weight initialisation, applied to the pooled sample).

Weight quantizers are set from the weight they see in that same pass, with the quantizer's own
MSE-optimal per-channel initialisation. Plain PyTorch: nothing here knows about a host.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence

import torch
from torch import nn

from ..config import CALIB_ESTIMATORS
from ..quant.convert import iter_quantizers
from ..quant.quantizer import STEP_EPS, LSQQuantizer, _mse_best_scale, qrange

#: values kept per activation quantizer over the whole calibration set (spread evenly over the batches)
SAMPLE_BUDGET = 1 << 19


@dataclass
class ActStats:
    """What one activation quantizer saw over the calibration set."""

    absmax: float = 0.0
    negative: bool = False
    count: int = 0
    samples: List[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, per_batch: int) -> None:
        v = x.detach().float().reshape(-1)
        if v.numel() == 0:
            return
        self.absmax = max(self.absmax, float(v.abs().max()))
        self.negative = self.negative or bool((v < 0).any())
        self.count += v.numel()
        stride = max(1, v.numel() // max(1, per_batch))
        self.samples.append(v[::stride].clone())

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)


def estimate_step(stats: ActStats, bits: int, signed: bool, estimator: str, percentile: float = 99.99) -> torch.Tensor:
    """The per-tensor step ``estimator`` chooses for a ``bits``-wide grid from ``stats`` (a 0-dim tensor)."""
    if estimator not in CALIB_ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} is not one of {list(CALIB_ESTIMATORS)}")
    qmin, qmax = qrange(bits, signed)
    absmax = torch.tensor(max(stats.absmax, STEP_EPS))
    if estimator == "minmax":
        step = absmax / qmax
    elif estimator == "percentile":
        x = stats.sample().abs()
        if x.numel() > (1 << 24):  # torch.quantile's limit
            x = x[:: math.ceil(x.numel() / (1 << 24))]
        step = torch.quantile(x, percentile / 100.0) / qmax
    else:
        step = _mse_best_scale(stats.sample(), absmax, qmin, qmax, [])
    step = step.reshape(())
    return torch.where(step > STEP_EPS, step, torch.full_like(step, 1.0 / qmax))


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every quantizer of ``model`` passes its input through inside (the FP network); restored after."""
    before = {id(q): q.enabled for _, q in iter_quantizers(model)}
    for _, q in iter_quantizers(model):
        q.enabled = False
    try:
        yield
    finally:
        for _, q in iter_quantizers(model):
            q.enabled = before[id(q)]


def collect_and_set_steps(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any],
                          estimator: str = "mse", percentile: float = 99.99,
                          progress: bool = False) -> Dict[str, Any]:
    """Set every enabled quantizer's step of ``model`` from one FP pass over ``batches``.

    ``forward(model, batch)`` runs the model on one batch (the host knows its input format). The
    model is run in eval mode (BatchNorm's running statistics: the deployed network). Returns
    ``{"weights": n, "activations": n, "unused": [names of enabled quantizers that saw no input]}``.
    """
    from tqdm import tqdm

    active = {name: q for name, q in iter_quantizers(model) if q.enabled}
    stats: Dict[str, ActStats] = {n: ActStats() for n, q in active.items() if q.kind == "act"}
    weights_done: set = set()
    per_batch = max(1, SAMPLE_BUDGET // max(1, len(batches)))

    def hook(name: str) -> Callable[..., None]:
        def pre(q: LSQQuantizer, args: Any) -> None:
            x = args[0]
            if q.kind == "weight":
                if name not in weights_done:
                    q.initialize(x)
                    weights_done.add(name)
            else:
                stats[name].update(x, per_batch)
        return pre

    handles = [q.register_forward_pre_hook(hook(n)) for n, q in active.items()]
    was_training = model.training
    model.eval()
    try:
        with quantizers_off(model), torch.no_grad():
            for b in tqdm(batches, desc="calibrate: statistics", leave=False, dynamic_ncols=True,
                          disable=not progress):
                forward(model, b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unused = []
    for name, st in stats.items():
        q = active[name]
        if st.count == 0:
            unused.append(name)
            continue
        if q.signed is None:
            q.signed = st.negative
        q.set_step(estimate_step(st, q.bits, bool(q.signed), estimator, percentile))
    unused += [n for n, q in active.items() if q.kind == "weight" and n not in weights_done]
    return {"weights": len(weights_done), "activations": len(stats) - len([u for u in unused if u in stats]),
            "unused": unused}


def reestimate_bn(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any],
                  progress: bool = False) -> int:
    """Recompute every BatchNorm's running statistics on the quantized model (cumulative average over
    ``batches``, batch statistics in the forward pass as in training); returns how many it reset."""
    from tqdm import tqdm

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    try:
        with torch.no_grad():
            for b in tqdm(batches, desc="calibrate: BatchNorm", leave=False, dynamic_ncols=True, disable=not progress):
                forward(model, b)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return len(bns)
