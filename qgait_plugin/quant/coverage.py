"""Coverage report: which layers run quantized, at which bit widths, and how many MACs that covers;
with dataflow placement also which ops stay float where a quantized tensor enters them, and why.

MACs are counted at the level of torch functions (conv, linear, matmul, bmm, einsum, attention)
while the model runs on an example input, and charged to the innermost module that was running.
Products the converter cannot see as layers (attention between two activations, ``x @ W`` in a
module nobody registered) therefore show up as float MACs instead of vanishing from the total.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..compat import scaled_dot_product_attention
from ..spec import FP_BITS
from . import placement
from .layers import QuantLayerMixin


def _conv_macs(args: Sequence[Any], kwargs: Dict[str, Any], out: torch.Tensor) -> int:
    w = args[1] if len(args) > 1 else kwargs["weight"]
    groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    return out.numel() * (w.shape[1]) * math.prod(w.shape[2:]) if groups else 0


def _matmul_macs(args: Sequence[Any], kwargs: Dict[str, Any], out: torch.Tensor) -> int:
    a = args[0]
    return out.numel() * (a.shape[-1] if a.dim() else 1)


def _linear_macs(args: Sequence[Any], kwargs: Dict[str, Any], out: torch.Tensor) -> int:
    return out.numel() * args[0].shape[-1]


def _addmm_macs(args: Sequence[Any], kwargs: Dict[str, Any], out: torch.Tensor) -> int:
    return out.numel() * args[1].shape[-1]


def _einsum_macs(args: Sequence[Any], kwargs: Dict[str, Any], out: torch.Tensor) -> int:
    eq = args[0].replace(" ", "")
    ops = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
    lhs = eq.split("->")[0].split(",")
    sizes: Dict[str, int] = {}
    for term, t in zip(lhs, ops):
        for ch, n in zip(term.replace("...", ""), t.shape[-len(term.replace("...", "")):] if term else ()):
            sizes[ch] = n
    out_terms = eq.split("->")[1] if "->" in eq else ""
    reduced = [c for c in sizes if c not in out_terms]
    return out.numel() * math.prod(sizes[c] for c in reduced)


def _sdpa_macs(args: Sequence[Any], kwargs: Dict[str, Any], out: torch.Tensor) -> int:
    q, k = args[0], args[1]
    return 2 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]


_MAC_FUNCS = {
    F.conv1d: _conv_macs, F.conv2d: _conv_macs, F.conv3d: _conv_macs,
    F.linear: _linear_macs,
    torch.matmul: _matmul_macs, torch.Tensor.matmul: _matmul_macs, torch.Tensor.__matmul__: _matmul_macs,
    torch.bmm: _matmul_macs, torch.Tensor.bmm: _matmul_macs, torch.mm: _matmul_macs, torch.Tensor.mm: _matmul_macs,
    torch.addmm: _addmm_macs, torch.baddbmm: _addmm_macs,
    torch.einsum: _einsum_macs,
}
if scaled_dot_product_attention is not None:  # torch >= 2.0
    _MAC_FUNCS[scaled_dot_product_attention] = _sdpa_macs


class _MacCounter(TorchFunctionMode):
    def __init__(self, stack: List[str], counts: Dict[str, int]) -> None:
        super().__init__()
        self.stack, self.counts = stack, counts

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fn = _MAC_FUNCS.get(func)
        if fn is not None and isinstance(out, torch.Tensor):
            key = self.stack[-1] if self.stack else ""
            self.counts[key] = self.counts.get(key, 0) + int(fn(args, kwargs, out))
        return out


@dataclass
class CoverageRow:
    name: str
    type: str
    weight_bits: int
    act_bits: int
    macs: int
    quantized: bool
    note: str = ""


@dataclass
class CoverageReport:
    """Per-layer bit widths and MACs for one example input; ``quantized_mac_fraction`` in [0, 1]."""

    rows: List[CoverageRow] = field(default_factory=list)
    #: with dataflow placement, the ops that read a quantized tensor but compute in float (where the
    #: integer graph dequantizes), with the reason: :func:`~qgait_plugin.quant.placement.float_boundaries`
    stays_float: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def quantized_macs(self) -> int:
        return sum(r.macs for r in self.rows if r.quantized)

    @property
    def quantized_mac_fraction(self) -> float:
        return self.quantized_macs / self.total_macs if self.total_macs else 0.0

    def table(self) -> str:
        """A Markdown table, one row per layer that does multiply-accumulates, plus a total."""
        lines = ["| layer | type | W bits | A bits | MACs | quantized |", "|---|---|---:|---:|---:|---|"]
        def bits(b: int) -> str:
            return "fp" if b >= FP_BITS else str(b)

        for r in self.rows:
            q = "yes" if r.quantized else "no"
            lines.append(f"| {r.name or '(model)'} | {r.type} | {bits(r.weight_bits)} | {bits(r.act_bits)} | "
                         f"{r.macs:,} | {q}{' (' + r.note + ')' if r.note else ''} |")
        lines.append(f"| **total** | | | | {self.total_macs:,} | {100 * self.quantized_mac_fraction:.1f} % quantized |")
        if self.stays_float:
            lines += ["", "Stays float where a quantized tensor enters it:", "",
                      "| module | op | times | why |", "|---|---|---:|---|"]
            lines += [f"| {r['module'] or '(model)'} | {r['op']} | {r['count']} | {r['reason']} |"
                      for r in self.stays_float]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"quantized_mac_fraction": self.quantized_mac_fraction, "total_macs": self.total_macs,
                "rows": [r.__dict__ for r in self.rows], "stays_float": list(self.stays_float)}

    def __str__(self) -> str:
        return self.table()


def _layer_row(name: str, m: nn.Module, macs: int) -> CoverageRow:
    if isinstance(m, QuantLayerMixin):
        wq, aq = m.weight_quant, m.act_quant
        w_bits = wq.bits if wq.enabled else FP_BITS
        a_bits = aq.bits if aq.enabled else FP_BITS
        exact = m.qgait_exact_input and a_bits >= FP_BITS
        quantized = w_bits < FP_BITS and (a_bits < FP_BITS or exact)
        return CoverageRow(name, type(m).__name__, w_bits, a_bits, macs, quantized, "exact input" if exact else "")
    return CoverageRow(name, type(m).__name__, FP_BITS, FP_BITS, macs, False)


@torch.no_grad()
def coverage_report(model: nn.Module, example_inputs: Any,
                    forward_kwargs: Optional[Dict[str, Any]] = None) -> CoverageReport:
    """Run ``model`` once on ``example_inputs`` (a tensor or a tuple of positional args) and report.

    The model runs in eval mode when its quantizers are initialised, else in train mode for this
    one pass (so activation steps initialise from this input); its mode is restored afterwards.
    """
    stack: List[str] = []
    counts: Dict[str, int] = {}

    def enter(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(mod: nn.Module, inp: Any) -> None:
            stack.append(name)
        return hook

    def leave(mod: nn.Module, inp: Any, out: Any) -> None:
        stack.pop()

    handles = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))
    was_training = model.training
    from .quantizer import LSQQuantizer
    needs_init = any(isinstance(q, LSQQuantizer) and q.enabled and not bool(q.initialized) for q in model.modules())
    model.train(needs_init or was_training)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with _MacCounter(stack, counts):
            model(*args, **(forward_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    rows = []
    for name, m in modules.items():
        macs = counts.get(name, 0)
        if macs or isinstance(m, QuantLayerMixin):
            rows.append(_layer_row(name, m, macs))
    stays_float = []
    if isinstance(getattr(model, placement.ATTR, None), placement.Placement):  # in the mode of the pass above
        tr = placement.trace_quiet(model, example_inputs, forward_kwargs, training=needs_init or was_training)
        stays_float = placement.float_boundaries(tr, model)
    return CoverageReport(rows, stays_float)
