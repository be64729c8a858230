"""Activation quantizers placed from the model's dataflow, not from a list of block classes.

An integer runtime runs an op in integer kernels only when the tensors around it are quantized in
the shape its fusion expects (DESIGN.md, section 6): a conv's input comes from a DequantizeLinear
and its output goes only to a QuantizeLinear, an add has both inputs and its output quantized, a
concat's inputs share one scale, max pooling and view ops keep their input's scale. Which tensors
those are depends on how the model's code wires its layers, not on its classes. So
:func:`trace` runs the model once, eagerly, under a ``TorchFunctionMode`` and records which op made
each tensor and who reads it; :func:`plan` decides from that record, by the rule table
:data:`RULES`, which tensors get a quantizer; :class:`Placement` (a submodule of the model, so
state dicts, optimizer groups, ``iter_quantizers`` and DDP see its quantizers) applies them at run
time.

Rules (each tensor is quantized once, where it is produced, before it branches; every consumer
reads the quantized tensor):

========================  ===============================================================
op                        what is quantized
========================  ===============================================================
conv (+BN)(+ReLU)         the input (by its producer) and the output after BN / ReLU
linear, matmul by weight  the input (the output may stay float: MatMulIntegerToFloat)
add, mul of two tensors   both inputs and the output (after a ReLU that only it feeds)
concat, stack             the inputs and the output, all with one shared quantizer
max pool, max, view ops   nothing new: the output is on its input's grid (same quantizer)
LeakyReLU, sigmoid, avg   the output, with its own quantizer, when the input is quantized
anything else             nothing: a float boundary (mean, GeM's power, normalisation)
========================  ===============================================================

A tensor read by a quantized layer keeps that layer's own input quantizer (``act_quant``, with
the layer's configured bits) as its quantizer; other tensors get a new one (``quant.residual``
bits, sign decided on the first batch). Graph inputs keep the layers' own handling (the exact
first-layer input). Where a quantizer is applied is keyed by the module call it happens in and
the op's position in that call; a site whose op differs at run time (the dataflow changed) stays
float with a warning. The decisions are the placement's extra state, so a checkpoint carries them.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from ..spec import QuantizerSpec
from .layers import QuantLayerMixin, runtime_exact_eval
from .qlinear_add import qlinear_add_like_runtime
from .quantizer import LSQQuantizer

#: op name (the torch function's ``__name__``) -> its rule; see the module doc
RULES: Dict[str, str] = {}
for _names, _rule in (
    (("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), "conv"),
    (("linear", "matmul", "__matmul__", "bmm", "mm", "einsum"), "matmul"),
    (("batch_norm",), "bn"),
    (("relu", "relu_"), "relu"),
    (("add", "__add__", "__radd__", "__iadd__", "add_", "mul", "__mul__", "__rmul__", "__imul__", "mul_"),
     "add"),
    (("cat", "concat", "concatenate", "stack"), "cat"),
    (("max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
      "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
      "adaptive_max_pool2d", "adaptive_max_pool3d", "amax", "max", "view", "reshape", "transpose", "permute",
      "flatten", "squeeze", "unsqueeze", "contiguous", "__getitem__", "split", "chunk", "narrow", "select",
      "unbind", "split_with_sizes", "unflatten", "movedim", "clone", "repeat", "expand", "view_as",
      "reshape_as", "t"), "reuse"),
    (("leaky_relu", "leaky_relu_", "sigmoid", "hardsigmoid", "avg_pool1d", "avg_pool2d", "avg_pool3d",
      "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"), "requant"),
):
    for _n in _names:
        RULES[_n] = _rule
#: what every other op is
FLOAT = "float"
#: adds of two tensors that eval computes as the runtime's QLinearAdd (out of place, or ``+=``, whose
#: result Python rebinds); not ``add_`` (its result may be dropped) nor ``torch.add(..., alpha=)``
EXACT_ADDS = ("add", "__add__", "__iadd__")
#: reuse ops that an ONNX export may turn into control flow or gathers (``squeeze`` on a dynamic
#: shape becomes an ``If``) through which a runtime does not follow a DequantizeLinear: a quantized
#: layer reading their output gets its quantizer applied again there (same values, same quantizer)
REQUANTIZE_BEFORE_LAYER = ("squeeze", "unsqueeze", "select", "__getitem__", "split", "chunk", "unbind", "narrow")
#: dtype conversions: their output is the same value for the plan (a site goes to what made it)
CONVERSIONS = ("double", "float", "to", "half", "bfloat16", "type_as", "type")

#: how a group's reason names the conv whose output it quantizes
OUTPUT_OF = "output of "

#: the name of the placement submodule a model gets
ATTR = "qgait_placement"
#: state-dict suffixes of the running statistics a training-mode trace puts back
_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def rule(func_name: str) -> str:
    return RULES.get(func_name, FLOAT)


def _func_name(func: Any) -> str:
    return str(getattr(func, "__name__", type(func).__name__))


def _float_tensors(out: Any) -> List[torch.Tensor]:
    """The floating-point tensors an op returned (one tensor, or the members of a tuple/list)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return []


def _flat_tensors(args: Any, kwargs: Optional[Dict[str, Any]]) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []

    def walk(a: Any) -> None:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                walk(b)

    walk(args)
    walk(list((kwargs or {}).values()))
    return out


# -- module frames: where an op happens ------------------------------------------------------------------

class _Frames:
    """The stack of module calls while a model runs, each ``[key, ops counted so far]``.

    A frame's key is ``"<module path>#<k>"``, ``k`` counting that module's calls since the root
    forward began, so a module called twice in one forward (torchvision's shared ReLU) has two.
    """

    def __init__(self) -> None:
        self.stack: List[List[Any]] = []
        self.calls: Dict[str, int] = {}

    def reset(self) -> None:
        self.stack.clear()
        self.calls.clear()

    def push(self, name: str) -> str:
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        key = f"{name}#{k}"
        self.stack.append([key, 0])
        return key

    def next_op(self) -> Optional[Tuple[str, int]]:
        """``(frame key, op index)`` for an op that returned a tensor, counted in the innermost frame."""
        if not self.stack:
            return None
        top = self.stack[-1]
        idx = top[1]
        top[1] = idx + 1
        return top[0], idx


def _module_names(model: nn.Module) -> Dict[int, str]:
    return {id(m): name for name, m in model.named_modules() if not isinstance(m, Placement)}


# -- the trace ------------------------------------------------------------------------------------------

@dataclass
class Node:
    """One op of the traced forward: its rule, where it ran, which values it read and made."""

    func: str
    rule: str
    frame: str
    index: int
    module: str
    inputs: List[int]
    outputs: List[int]
    sizes: List[int] = field(default_factory=list)  # numel of each output


@dataclass
class Trace:
    """The dataflow of one forward: ops in execution order, values by number, frame outputs."""

    nodes: List[Node] = field(default_factory=list)
    producer: Dict[int, int] = field(default_factory=dict)  # value -> node index
    consumers: Dict[int, List[int]] = field(default_factory=dict)  # value -> node indices
    const: Set[int] = field(default_factory=set)  # values made only from parameters and buffers
    frame_output: Dict[str, int] = field(default_factory=dict)  # frame key -> the value it returned
    model_outputs: Set[int] = field(default_factory=set)
    param_names: Dict[int, str] = field(default_factory=dict)  # value -> parameter name in the model
    frame_ops: Dict[str, int] = field(default_factory=dict)  # frame key -> ops counted in it

    def weight_matmuls(self, model: nn.Module) -> List[Tuple[str, str]]:
        """``(module, parameter)`` of submodules that multiply an activation by their own raw
        parameter (``x.matmul(self.fc_bin)``) but are no quantized layer yet: a per-part FC nobody
        registered. The model itself is left out (its class is the user's entry point)."""
        layers = {name for name, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
        found: List[Tuple[str, str]] = []
        for n in self.nodes:
            if n.rule != "matmul" or not n.module or n.module in layers:
                continue
            acts = [v for v in n.inputs if v not in self.const]
            for v in n.inputs:
                full = self.param_names.get(v, "")
                mod, _, pname = full.rpartition(".")
                if acts and mod == n.module and (n.module, pname) not in found:
                    found.append((n.module, pname))
        return found


class _Recorder(TorchFunctionMode):
    def __init__(self, frames: _Frames, trace: Trace, value_of: Callable[[torch.Tensor], int],
                 keep: List[torch.Tensor], module_of_frame: Callable[[], str]) -> None:
        super().__init__()
        self.frames, self.trace, self.value_of, self.keep = frames, trace, value_of, keep
        self.module_of_frame = module_of_frame

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        ins = [self.value_of(t) for t in _flat_tensors(args, kwargs)]
        out = func(*args, **(kwargs or {}))
        outs = _float_tensors(out)
        if not outs:
            return out
        where = self.frames.next_op()
        if where is None:
            return out
        tr = self.trace
        name = _func_name(func)
        if name in CONVERSIONS and len(outs) == 1 and ins:
            self.keep.append(outs[0])
            self.value_of(outs[0], alias=ins[0])  # type: ignore[call-arg]
            return out
        n = len(tr.nodes)
        values = []
        for t in outs:
            self.keep.append(t)
            v = self.value_of(t, fresh=True)  # type: ignore[call-arg]
            values.append(v)
            tr.producer[v] = n
        for v in ins:
            tr.consumers.setdefault(v, []).append(n)
        if ins and all(v in tr.const for v in ins):
            tr.const.update(values)
        tr.nodes.append(Node(name, rule(name), where[0], where[1], self.module_of_frame(), ins, values,
                             [t.numel() for t in outs]))
        return out


@torch.no_grad()
def trace(model: nn.Module, example_inputs: Any, forward_kwargs: Optional[Dict[str, Any]] = None,
          training: bool = False) -> Trace:
    """Run ``model`` once in eval mode (``training``: in training mode, its normalisation statistics
    left as they were) on ``example_inputs`` (a tensor or a tuple) and record its dataflow.

    The model should have its quantizers switched off (:func:`place` does that), so the record holds
    the model's own ops; the frames are those the placement keys its sites by.
    """
    tr = Trace()
    frames = _Frames()
    ids: Dict[int, int] = {}
    keep: List[torch.Tensor] = []
    counter = [0]

    def value_of(t: torch.Tensor, fresh: bool = False, alias: Optional[int] = None) -> int:
        if alias is not None:
            ids[id(t)] = alias
        elif fresh or id(t) not in ids:
            counter[0] += 1
            ids[id(t)] = counter[0]
        return ids[id(t)]

    for pname, p in model.named_parameters():
        keep.append(p)
        tr.const.add(value_of(p))
        if p.dim() >= 2:
            tr.param_names[value_of(p)] = pname
    for b in model.buffers():
        keep.append(b)
        tr.const.add(value_of(b))
    names = _module_names(model)
    mods: List[str] = []
    handles = []

    def pre(m: nn.Module, inp: Any) -> None:
        frames.push(names[id(m)])
        mods.append(names[id(m)])

    def post(m: nn.Module, inp: Any, out: Any) -> None:
        key, count = frames.stack.pop()
        tr.frame_ops[key] = count
        mods.pop()
        if isinstance(out, torch.Tensor) and id(out) in ids:
            tr.frame_output[key] = ids[id(out)]

    for m in model.modules():
        if id(m) in names:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.train(training)
    stats = [(b, b.clone()) for n, b in model.named_buffers() if n.endswith(_NORM_STATS)] if training else []
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with _Recorder(frames, tr, value_of, keep, lambda: mods[-1] if mods else ""):
            out = model(*args, **(forward_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for buf, saved in stats:
            buf.copy_(saved)
    tr.model_outputs = {ids[id(t)] for t in _flat_tensors(out if not isinstance(out, dict) else list(out.values()),
                                                          None) if id(t) in ids}
    return tr


# -- the plan -------------------------------------------------------------------------------------------

@dataclass
class Group:
    """One quantizer and the places it is applied: ops' outputs and module outputs, and the layers
    whose input it quantizes (the first of those owns it, as its ``act_quant``).

    ``deferred`` pairs a site with a later one where training applies the quantizer instead
    (:meth:`_Planner.defer_target`): the same values on fewer elements."""

    op_sites: List[Tuple[str, int, str]] = field(default_factory=list)  # (frame, op index, func name)
    out_sites: List[str] = field(default_factory=list)  # frame keys
    layers: List[str] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)
    deferred: List[Tuple[SiteRef, SiteRef]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = {"op_sites": [list(s) for s in self.op_sites], "out_sites": list(self.out_sites),
             "layers": list(self.layers), "reasons": list(self.reasons)}
        if self.deferred:  # absent, not empty, so plans saved before deferral compare equal to their reload
            d["deferred"] = [[list(a), list(b)] for a, b in self.deferred]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Group:
        return cls([(str(a), int(b), str(c)) for a, b, c in d["op_sites"]], [str(s) for s in d["out_sites"]],
                   [str(s) for s in d["layers"]], [str(s) for s in d.get("reasons", [])],
                   [(_site_ref(a), _site_ref(b)) for a, b in d.get("deferred", [])])


#: where a quantizer is applied: ``("op", frame, op index, func name)`` or ``("out", frame)``
SiteRef = Tuple[Any, ...]


def _site_ref(raw: Sequence[Any]) -> SiteRef:
    if raw[0] == "op":
        return ("op", str(raw[1]), int(raw[2]), str(raw[3]))
    if raw[0] == "out":
        return ("out", str(raw[1]))
    raise ValueError(f"a site is ['op', frame, index, func] or ['out', frame], not {list(raw)!r}")


def _site_key(ref: SiteRef) -> Any:
    """The run-time key of a site: ``(frame, op index)`` for an op, the frame key for a module output."""
    return (ref[1], ref[2]) if ref[0] == "op" else ref[1]


@dataclass
class Plan:
    """What a trace decided: the quantizer groups, and the ``(module, parameter)`` pairs converted
    as weight matmuls because the trace saw them multiply by their own parameter."""

    groups: List[Group]
    weight_matmuls: List[Tuple[str, str]] = field(default_factory=list)
    #: ops the trace counted in each frame that holds an op site: a different count at run time
    #: means the dataflow changed there (a branch or a loop), and is warned about
    frame_ops: Dict[str, int] = field(default_factory=dict)
    #: the adds an integer runtime runs as QLinearAdd, which eval computes in its arithmetic
    #: (:mod:`.qlinear_add`): ``(frame, op index, func, group of a, group of b, group of the output,
    #: whether a ReLU lies between the add and its output's quantizer)``
    adds: List[Tuple[str, int, str, int, int, int, bool]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = {"groups": [g.to_dict() for g in self.groups], "weight_matmuls": [list(w) for w in self.weight_matmuls],
             "frame_ops": dict(self.frame_ops)}
        if self.adds:  # absent, not empty: a plan saved before has none and reloads equal
            d["adds"] = [list(a) for a in self.adds]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Plan:
        return cls([Group.from_dict(g) for g in d["groups"]],
                   [(str(a), str(b)) for a, b in d.get("weight_matmuls", [])],
                   {str(k): int(v) for k, v in d.get("frame_ops", {}).items()},
                   [(str(f), int(i), str(fn), int(a), int(b), int(c), bool(r))
                    for f, i, fn, a, b, c, r in d.get("adds", [])])


def make_plan(tr: Trace, model: nn.Module, weight_matmuls: Sequence[Tuple[str, str]] = ()) -> Plan:
    """:func:`plan`'s groups with what else a :class:`Plan` records from the trace."""
    p = _planner(tr, model)
    groups = p.groups()
    frames = {f for g in groups for f, _, _ in g.op_sites} | \
        {b[1] for g in groups for _, b in g.deferred if b[0] == "op"} | {a[0] for a in p.add_records}
    return Plan(groups, list(weight_matmuls), {f: tr.frame_ops[f] for f in sorted(frames) if f in tr.frame_ops},
                p.add_records)


class _Planner:
    """Applies :data:`RULES` to a :class:`Trace`, node by node in execution order."""

    def __init__(self, tr: Trace, layers: Dict[str, QuantLayerMixin]) -> None:
        self.tr, self.layers = tr, layers
        self.parent: List[int] = []
        self.group_of: Dict[int, int] = {}  # value -> group (before union-find)
        self.sited: Dict[int, int] = {}  # value -> group whose quantizer is applied where it is made
        self.reasons: Dict[int, List[str]] = {}
        self.covered: Dict[str, int] = {}  # layer -> group of its input
        self.from_input: Set[int] = set()  # values that are graph inputs or views of them
        self.adds: List[Tuple[Node, int, int, int]] = []  # QLinearAdd candidates: node, a, b, output value
        self.add_records: List[Tuple[str, int, str, int, int, int, bool]] = []  # set by groups()

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
        return min(a, b)

    def new_group(self, reason: str) -> int:
        self.parent.append(len(self.parent))
        self.reasons[len(self.parent) - 1] = [reason]
        return len(self.parent) - 1

    def group(self, v: int) -> Optional[int]:
        g = self.group_of.get(v)
        return None if g is None else self.find(g)

    def activation(self, v: int) -> bool:
        return v not in self.tr.const

    def sole_consumer(self, v: int) -> Optional[Node]:
        cons = self.tr.consumers.get(v, [])
        if len(cons) != 1 or v in self.tr.model_outputs:
            return None
        return self.tr.nodes[cons[0]]

    def absorb(self, v: int, rules: Tuple[str, ...]) -> int:
        """Follow ``v`` through the ops of ``rules`` that are its only reader (conv -> BN -> ReLU)."""
        while True:
            nxt = self.sole_consumer(v)
            if nxt is None or nxt.rule not in rules or len(nxt.outputs) != 1 or nxt.inputs[:1] != [v]:
                return v
            v = nxt.outputs[0]
            rules = tuple(r for r in rules if r != "bn") if nxt.rule == "relu" else rules

    def site(self, v: int, g: Optional[int], reason: str) -> Optional[int]:
        """Quantize value ``v`` where it is made, with group ``g`` (a new one when ``None``)."""
        if v in self.from_input or v not in self.tr.producer:
            return None
        old = self.group(v)
        if old is not None:
            self.reasons[old].append(reason)
            return old if g is None else self.union(old, g)
        g = self.new_group(reason) if g is None else g
        self.group_of[v] = g
        self.sited[v] = g
        self.reasons.setdefault(self.find(g), []).append(reason)
        return self.find(g)

    def run(self) -> None:
        tr = self.tr
        for v in list(tr.consumers):
            if v not in tr.producer and v not in tr.const:
                self.from_input.add(v)
        for n in tr.nodes:
            acts = [v for v in n.inputs if self.activation(v)]
            if n.rule in ("conv", "matmul") and n.module in self.layers and acts:
                layer = self.layers[n.module]
                if layer.act_quant.enabled:
                    g = self.site(acts[0], None, f"input of {n.module}")
                    if g is not None:
                        self.covered[n.module] = g
                        made = tr.producer.get(acts[0])
                        if acts[0] not in self.sited and made is not None and \
                                tr.nodes[made].func in REQUANTIZE_BEFORE_LAYER:
                            self.sited[acts[0]] = g
                if n.rule == "conv" and layer.weight_quant.enabled:
                    self.site(self.absorb(n.outputs[0], ("bn", "relu")), None, f"{OUTPUT_OF}{n.module}")
            elif n.rule == "add" and len(acts) == 2 and len(n.outputs) == 1:
                if any(self.group(v) is not None for v in acts) and not any(v in self.from_input for v in acts):
                    for v in acts:
                        self.site(v, None, f"{n.func} input")
                    out = self.absorb(n.outputs[0], ("relu",))
                    self.site(out, None, f"{n.func} output")
                    if n.func in EXACT_ADDS and n.inputs == acts:
                        self.adds.append((n, acts[0], acts[1], out))
            elif n.rule == "cat" and acts:
                if any(self.group(v) is not None for v in acts) and not any(v in self.from_input for v in acts):
                    shared: Optional[int] = None
                    for v in acts:
                        shared = self.site(v, shared, f"{n.func} input")
                    self.site(n.outputs[0], shared, f"{n.func} output")
            elif n.rule in ("reuse", "relu") and acts:
                g = self.group(acts[0])
                for o in n.outputs:
                    if acts[0] in self.from_input:
                        self.from_input.add(o)
                    elif g is not None and o not in self.group_of:
                        self.group_of[o] = g
            elif n.rule == "requant" and acts and self.group(acts[0]) is not None:
                self.site(n.outputs[0], None, f"{n.func} output")

    def size(self, v: int) -> int:
        n = self.tr.nodes[self.tr.producer[v]]
        return n.sizes[n.outputs.index(v)] if len(n.sizes) == len(n.outputs) else 0

    def defer_target(self, v: int) -> int:
        """The value after the longest chain of reuse ops that are each the only reader of the one
        before (``relu -> max_pool -> view``), where it is smallest; ``v`` itself when none is smaller.

        Why: a quantizer is monotone (``round``, ``clamp`` and the scaling never reverse an order)
        and these ops only select, reorder or take maxima, so quantizing at the end of the chain
        gives bit for bit the values of quantizing at ``v``, on fewer elements (a 2x2 max pool: a
        quarter). Training applies it there; eval and export keep it where the tensor is made,
        which is where the integer graph needs its QuantizeLinear."""
        best, w = v, v
        size = self.size(v)
        while True:
            nxt = self.sole_consumer(w)
            if nxt is None or nxt.rule != "reuse" or len(nxt.outputs) != 1 or nxt.inputs[:1] != [w] \
                    or any(self.activation(u) for u in nxt.inputs[1:]):
                return best
            w = nxt.outputs[0]
            if w in self.sited or w in self.from_input:
                return best
            if 0 < self.size(w) < size:
                best, size = w, self.size(w)

    def site_ref(self, v: int) -> SiteRef:
        n = self.tr.nodes[self.tr.producer[v]]
        if self.tr.frame_output.get(n.frame) == v:
            return ("out", n.frame)
        return ("op", n.frame, n.index, n.func)

    def groups(self) -> List[Group]:
        by_root: Dict[int, Group] = {}
        order: List[int] = []
        for v, g in sorted(self.sited.items()):
            root = self.find(g)
            if root not in by_root:
                by_root[root] = Group()
                order.append(root)
            grp = by_root[root]
            ref = self.site_ref(v)
            if ref[0] == "out":
                grp.out_sites.append(ref[1])
            else:
                grp.op_sites.append(ref[1:])
            later = self.defer_target(v)
            if later != v:
                grp.deferred.append((ref, self.site_ref(later)))
        for layer, g in self.covered.items():
            root = self.find(g)
            if root in by_root:
                by_root[root].layers.append(layer)
        for root, grp in by_root.items():
            grp.reasons = sorted({r for g in range(len(self.parent)) if self.find(g) == root
                                  for r in self.reasons.get(g, [])})
        index = {root: i for i, root in enumerate(order)}
        self.add_records = []
        for n, a, b, out in self.adds:
            ga, gb, gc = (self.group(v) for v in (a, b, out))
            if ga in index and gb in index and gc in index:
                self.add_records.append((n.frame, n.index, n.func, index[ga], index[gb], index[gc],
                                         out != n.outputs[0]))
        return [by_root[r] for r in order]


def _planner(tr: Trace, model: nn.Module) -> _Planner:
    p = _Planner(tr, {name: m for name, m in model.named_modules() if isinstance(m, QuantLayerMixin)})
    p.run()
    return p


def plan(tr: Trace, model: nn.Module) -> List[Group]:
    """The quantizer groups :data:`RULES` give for ``tr`` (a trace of ``model``)."""
    return _planner(tr, model).groups()


#: why an op the rule table leaves float stays float, by torch function name (first match wins)
FLOAT_REASONS: Tuple[Tuple[Tuple[str, ...], str], ...] = (
    (("mean", "sum", "nanmean"), "a mean or sum: no integer kernel in the runtimes' QDQ fusions (ReduceMean)"),
    (("pow", "__pow__", "sqrt", "rsqrt", "exp", "log", "div", "__truediv__", "reciprocal", "clamp", "clamp_min"),
     "a power, root, division or clamp (GeM's p-th power and root among them): float by the rule table"),
    (("softmax", "log_softmax", "normalize", "layer_norm", "group_norm", "instance_norm", "batch_norm", "norm"),
     "a softmax or a normalisation not folded into a conv: float by the rule table"),
    (("interpolate", "upsample", "upsample_nearest2d", "upsample_bilinear2d"),
     "a resize: float by the rule table (a nearest-neighbour one could keep its input's grid; not done)"),
)
#: the reason of a float op not in :data:`FLOAT_REASONS`
OTHER_FLOAT = "no integer form in the rule table"
#: why a product of two activations stays float
ACT_PRODUCT = "a product of two activations (attention): onnxruntime's QDQ fusions have no integer kernel for it"


def float_reason(func_name: str) -> str:
    return next((why for names, why in FLOAT_REASONS if func_name in names), OTHER_FLOAT)


def float_boundaries(tr: Trace, model: nn.Module) -> List[Dict[str, Any]]:
    """The ops of ``tr`` (a trace of ``model``) that read a tensor the placement quantizes but compute in
    float, where the integer graph dequantizes: ``[{"module", "op", "count", "reason"}]`` in order."""
    p = _planner(tr, model)
    out: Dict[Tuple[str, str, str], int] = {}
    for n in tr.nodes:
        acts = [v for v in n.inputs if p.activation(v)]
        if not any(p.group(v) is not None for v in acts):
            continue
        if n.rule == FLOAT:
            why = float_reason(n.func)
        elif n.rule == "matmul" and n.module not in p.layers and len(acts) >= 2:
            why = ACT_PRODUCT
        else:
            continue
        key = (n.module, n.func, why)
        out[key] = out.get(key, 0) + 1
    return [{"module": m, "op": f, "count": c, "reason": w} for (m, f, w), c in out.items()]


# -- run time -------------------------------------------------------------------------------------------

class _Apply(TorchFunctionMode):
    """Applies the op sites while the model runs (module-output sites are forward hooks)."""

    def __init__(self, placement: Placement) -> None:
        super().__init__()
        self.p = placement

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            if not out.is_floating_point():
                return out
        elif not _float_tensors(out):
            return out
        p = self.p
        where = p._frames.next_op()
        if where is None:
            return out
        if p._adds and not p.training:
            out = p._exact_add(where, func, args, kwargs, out)
        site = p._op_sites.get(where)
        if site is None:
            return p._apply_deferred(where, out, _func_name(func)) if p._pending else out
        name, q = site
        if _func_name(func) != name:
            p._warn(where, f"expected {name}, the model ran {_func_name(func)}")
            return out
        return p._apply_site(where, q, out)


def _first_float(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    return next((t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


def _map_first_float(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``out`` with ``fn`` applied to it (a tensor) or to its first floating-point member (a tuple:
    ``torch.max(x, dim)`` returns values and indices)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    first = True
    items = []
    for t in out:
        if first and isinstance(t, torch.Tensor) and t.is_floating_point():
            t, first = fn(t), False
        items.append(t)
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)


class Placement(nn.Module):
    """The dataflow-placed quantizers of a model and the hooks that apply them.

    Registered as the model's ``qgait_placement`` submodule. ``quantizers`` holds the quantizers no
    layer owns; the plan (:class:`Group` list) is the extra state, so a checkpoint records it and
    a model built from the checkpoint's plan (:func:`apply_plan`) needs no trace.

    In training a site with a ``deferred`` partner leaves its tensor float and the partner (the end
    of a chain of max pooling and view ops) quantizes the smaller tensor there with the same
    quantizer: the same values, and LSQ's gradient scale of the original site (its element count).
    A quantizer not yet initialised is applied at the original site, so it initialises from the
    tensor it quantizes in eval and export.
    """

    def __init__(self, plan: Plan, specs: Sequence[Optional[QuantizerSpec]]) -> None:
        super().__init__()
        self.plan = plan
        self.groups = list(plan.groups)
        self.quantizers = nn.ModuleList([LSQQuantizer.from_spec(s) for s in specs if s is not None])
        self.owned = [s is not None for s in specs]
        object.__setattr__(self, "_frames", _Frames())
        object.__setattr__(self, "_resolved", [])
        object.__setattr__(self, "_op_sites", {})
        object.__setattr__(self, "_out_sites", {})
        object.__setattr__(self, "_defer", {})
        object.__setattr__(self, "_targets", {})
        object.__setattr__(self, "_pending", {})
        object.__setattr__(self, "_adds", {})
        object.__setattr__(self, "_frame_targets", {})
        object.__setattr__(self, "_defer_only_frames", set())
        object.__setattr__(self, "_warned", set())
        object.__setattr__(self, "_mode", None)

    _frames: _Frames
    _resolved: List[LSQQuantizer]
    _op_sites: Dict[Tuple[str, int], Tuple[str, LSQQuantizer]]
    _out_sites: Dict[str, LSQQuantizer]
    _defer: Dict[Any, Any]  # site key -> the key of the site training applies its quantizer at
    _targets: Dict[Any, Tuple[Optional[str], LSQQuantizer]]  # deferred-to site key -> (op name or None, quantizer)
    _frame_targets: Dict[str, List[Tuple[str, int]]]  # frame -> the deferred-to op sites in it
    _defer_only_frames: Set[str]  # frames whose op count is checked for deferred sites only (in training)
    _pending: Dict[Any, int]  # deferred-to site key -> per-sample element count of the deferred tensor
    _adds: Dict[Tuple[str, int], Tuple[str, LSQQuantizer, LSQQuantizer, LSQQuantizer, bool]]
    _warned: Set[Any]
    _mode: Optional[_Apply]

    def forward(self, x: Any) -> Any:
        """Identity: a model that is an ``nn.Sequential`` calls every child in order, this one included."""
        return x

    def _warn(self, where: Any, why: str, then: str = "this site stays float") -> None:
        if where not in self._warned:
            self._warned.add(where)
            warnings.warn(f"quantizer site {where}: the dataflow changed since the trace ({why}); {then}",
                          stacklevel=3)

    def _apply_site(self, key: Any, q: LSQQuantizer, out: Any) -> Any:
        """``out`` quantized by ``q`` at site ``key``, or left float for a later site in training."""
        later = self._defer.get(key)
        if later is not None and self.training and q.enabled and bool(q.initialized):
            t = _first_float(out)
            if t is not None:
                # from the shape, not t[0]: an indexing op here would count as an op of the enclosing frame
                self._pending[later] = math.prod(t.shape[1:]) if t.dim() > 1 else t.numel()
                return out
        return _map_first_float(out, q)

    def _apply_deferred(self, key: Any, out: Any, func_name: Optional[str] = None) -> Any:
        """``out`` quantized for the site deferred to ``key``, if one is pending; an op of another name than
        traced leaves it pending (the frame's exit then quantizes the module's output)."""
        if key not in self._pending:
            return out
        func, q = self._targets[key]
        if func is not None and func_name is not None and func_name != func:
            return out
        numel = self._pending.pop(key)
        return _map_first_float(out, lambda t: q(t, grad_numel=numel))

    def _stop_deferring(self, frame: str) -> None:
        """Quantize at the sources again for the deferred sites in ``frame`` (its dataflow changed)."""
        targets = set(self._frame_targets.pop(frame, ()))
        for src in [k for k, t in self._defer.items() if t in targets]:
            del self._defer[src]

    def _exact_add(self, where: Tuple[str, int], func: Any, args: Sequence[Any], kwargs: Optional[Dict[str, Any]],
                   out: Any) -> Any:
        """In eval, the add at ``where`` recomputed as the runtime's QLinearAdd (:mod:`.qlinear_add`) when
        its inputs are on their quantizers' grids; ``out`` (the float sum) otherwise."""
        add = self._adds.get(where)
        if add is None or kwargs or len(args) != 2 or not isinstance(out, torch.Tensor):
            return out
        name, qa, qb, qc, relu = add
        a, b = args
        if _func_name(func) != name or not runtime_exact_eval() or torch.jit.is_tracing() \
                or not all(q.enabled and bool(q.initialized) for q in (qa, qb, qc)) or (relu and qc.signed) \
                or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape \
                or out.dtype != torch.float32 or out.device.type != "cpu":
            return out
        exact = qlinear_add_like_runtime(a, b, qa, qb, qc)
        if name == "__iadd__":  # in place: every reference to the tensor sees the runtime's sum
            return out.copy_(exact)
        return exact

    def resolve(self, model: nn.Module) -> None:
        """Find each group's quantizer (a layer's ``act_quant`` or one of :attr:`quantizers`) and
        share it with the group's other layers; index the sites."""
        mods = dict(model.named_modules())
        own = iter(self.quantizers)
        qs: List[Any] = []
        for grp, owned in zip(self.groups, self.owned):
            q: Any
            if owned:
                q = next(own)
            else:
                owner: Any = mods[grp.layers[0]]
                q = owner.act_quant
            for name in grp.layers:
                layer: Any = mods[name]
                if layer.act_quant is not q:
                    del layer.act_quant
                    object.__setattr__(layer, "act_quant", q)
                layer.qgait_input_quantized = True
            qs.append(q)
        for grp, q in zip(self.groups, qs):  # a conv's output quantizer, for its runtime-exact eval (quant/bias.py)
            for reason in grp.reasons:
                layer = mods.get(reason[len(OUTPUT_OF):]) if reason.startswith(OUTPUT_OF) else None
                if isinstance(layer, QuantLayerMixin):
                    object.__setattr__(layer, "qgait_output_quant", q)
                    name = reason[len(OUTPUT_OF):]
                    if any(f.rsplit("#", 1)[0] == name for f in grp.out_sites):  # no BatchNorm between
                        object.__setattr__(layer, "qgait_requant_direct", q)
        self._resolved[:] = qs
        for index in (self._op_sites, self._out_sites, self._defer, self._targets, self._pending,
                      self._frame_targets, self._defer_only_frames):
            index.clear()
        for grp, q in zip(self.groups, qs):
            for frame, idx, func in grp.op_sites:
                self._op_sites[(frame, idx)] = (func, q)
            for frame in grp.out_sites:
                self._out_sites[frame] = q
            for here, later in grp.deferred:
                self._defer[_site_key(here)] = _site_key(later)
                self._targets[_site_key(later)] = (later[3] if later[0] == "op" else None, q)
                if later[0] == "op":
                    self._frame_targets.setdefault(later[1], []).append(_site_key(later))
        checked = {f for f, _ in self._op_sites} | {a[0] for a in self.plan.adds}
        self._defer_only_frames.update(f for f in self._frame_targets if f not in checked)
        self._adds.clear()
        for frame, idx, func, ia, ib, ic, relu in self.plan.adds:
            self._adds[(frame, idx)] = (func, qs[ia], qs[ib], qs[ic], relu)

    def install(self, model: nn.Module) -> None:
        """Hook every module of ``model``: frames for the op keys, module-output sites, and the mode."""
        names = _module_names(model)
        for m in model.modules():
            if id(m) not in names:
                continue
            name = names[id(m)]
            m.register_forward_pre_hook(functools.partial(self._enter, name, m is model))
            post = functools.partial(self._leave, m is model)
            try:
                m.register_forward_hook(post, always_call=True)
            except TypeError:  # torch < 2.1
                m.register_forward_hook(post)

    def _enter(self, name: str, root: bool, module: nn.Module, inputs: Any) -> None:
        if root:
            self._frames.reset()
            self._pending.clear()
            mode = _Apply(self)
            object.__setattr__(self, "_mode", mode)
            self._frames.push(name)
            mode.__enter__()
        else:
            if self._mode is None and not self._frames.stack and self.plan.frame_ops:
                self._warn("forward", "the model's forward was called directly, which skips its hooks, so the "
                           "sites in its own forward code stay float: call the model itself, or run the forward "
                           "inside placement.root_call(model)")
            self._frames.push(name)

    def _leave(self, root: bool, module: nn.Module, inputs: Any, out: Any, sites: bool = True) -> Any:
        if not self._frames.stack:
            return None
        key, count = self._frames.stack.pop()
        changed = False
        for t in self._frame_targets.get(key, ()) if sites else ():
            if t in self._pending:  # the op traced here did not run: quantize what the module returns
                if isinstance(out, (torch.Tensor, tuple, list)) and _first_float(out) is not None:
                    out, changed = self._apply_deferred(t, out), True
                else:
                    self._pending.pop(t)
                    self._warn(t, f"the module returned {type(out).__name__}; a site training quantizes here "
                               "stayed float")
        expected = self.plan.frame_ops.get(key)
        if expected is not None and count != expected and (self.training or key not in self._defer_only_frames):
            why = f"{count} ops ran where the trace saw {expected}"
            if self.training and key in self._frame_targets:  # OpenGait's pooling with sequence lengths
                self._stop_deferring(key)
                self._warn(key, why, "training quantizes the tensors pooled here where they are made from now on")
            else:
                self._warn(key, why)
        q = self._out_sites.get(key) if sites else None
        if root and self._mode is not None:
            mode = self._mode
            object.__setattr__(self, "_mode", None)
            mode.__exit__(None, None, None)
        deferred = sites and key in self._pending
        if root and self._pending and not deferred:
            self._warn(tuple(self._pending), "a site training quantizes at, after max pooling or a view, did not run")
            self._pending.clear()
        if q is None and not deferred:
            return out if changed else None
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return self._apply_site(key, q, out) if q is not None else self._apply_deferred(key, out)
        self._warn(key, f"the module returned {type(out).__name__}, not a tensor")
        return out if changed else None

    def get_extra_state(self) -> Dict[str, Any]:
        return self.plan.to_dict()

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("groups") != self.plan.to_dict()["groups"]:
            raise ConfigError("checkpoint: its quantizer placement (qgait_placement) differs from this model's; "
                              "build the model from the checkpoint's plan (placement.plan_from_state_dict)")


class TracedPlacement(Placement):
    """A :class:`Placement` without extra state, for the duration of a TorchScript trace (an ONNX
    export), which cannot hold a dict in a state dict."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


def remove(model: nn.Module) -> None:
    """Undo :func:`install_placement`: hooks and the placement submodule removed, layers' flags cleared."""
    p = getattr(model, ATTR, None)
    if not isinstance(p, Placement):
        return
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for k, h in list(hooks.items()):
                if isinstance(h, functools.partial) and getattr(h.func, "__self__", None) is p:
                    del hooks[k]
        m.__dict__.pop("qgait_input_quantized", None)
        m.__dict__.pop("qgait_output_quant", None)
        m.__dict__.pop("qgait_requant_direct", None)
    delattr(model, ATTR)


@contextlib.contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """Inside, ops that run within ``model``'s forward are not its own (a teacher network called from
    it): no site is applied to them and they are not counted (nothing happens without a placement)."""
    p = getattr(model, ATTR, None)
    mode = p._mode if isinstance(p, Placement) else None
    if mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


@contextlib.contextmanager
def root_call(model: nn.Module) -> Iterator[None]:
    """Around ``model``'s own forward code, for frameworks that call ``model.forward(x)`` rather than
    ``model(x)`` (OpenGait's inference), which skips the module's hooks: the root's placement hooks run
    here instead. Inside a normal call (the hooks ran) it does nothing."""
    p = getattr(model, ATTR, None)
    if not isinstance(p, Placement) or p._mode is not None:
        yield
        return
    name = _module_names(model)[id(model)]
    p._enter(name, True, model, ())
    try:
        yield
    finally:
        p._leave(True, model, (), None, sites=False)


def install_placement(model: nn.Module, plan: Plan, spec: QuantizerSpec) -> Placement:
    """Give ``model`` the quantizers of ``plan`` (new ones built from ``spec``) and hook them in."""
    specs = [None if grp.layers else spec for grp in plan.groups]
    device = next(iter(model.parameters())).device
    p = Placement(plan, specs).to(device)
    model.add_module(ATTR, p)
    p.resolve(model)
    p.install(model)
    return p


def trace_quiet(model: nn.Module, example_inputs: Any, forward_kwargs: Optional[Dict[str, Any]] = None,
                training: bool = False) -> Trace:
    """:func:`trace` with every quantizer of ``model`` switched off for the run (and back on after)."""
    qs = [(q, q.enabled) for q in model.modules() if isinstance(q, LSQQuantizer)]
    for q, _ in qs:
        q.enabled = False
    try:
        return trace(model, example_inputs, forward_kwargs, training)
    finally:
        for q, on in qs:
            q.enabled = on


def plan_from_state_dict(state_dict: Dict[str, Any], prefix: str = "") -> Optional[Plan]:
    """The placement plan a checkpoint's state dict records (for ``quantize_model(..., plan=)``),
    or ``None`` when it has none (a checkpoint of block-registry placement or of layers only)."""
    state = state_dict.get(f"{prefix}{ATTR}._extra_state")
    if state is None:
        return None
    try:
        return Plan.from_dict(state)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"checkpoint: {ATTR}._extra_state is malformed ({type(e).__name__}: {e})") from None


def site_counts(model: nn.Module) -> Dict[str, int]:
    """How many quantizer groups and sites the model's placement has (empty without one)."""
    p = getattr(model, ATTR, None)
    if not isinstance(p, Placement):
        return {}
    return {"groups": len(p.groups), "op_sites": sum(len(g.op_sites) for g in p.groups),
            "module_output_sites": sum(len(g.out_sites) for g in p.groups),
            "new_quantizers": len(p.quantizers)}
