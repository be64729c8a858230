"""What stays float in the graph a runtime runs, and why: read from onnxruntime's optimized graph.

An op "stays float" when it computes on floating-point tensors after onnxruntime's fusions (an
integer graph still dequantizes where no integer kernel exists). Ops that only move or reshape
data, and the QuantizeLinear/DequantizeLinear boundaries themselves, are not listed. Element types
are followed through the graph from its inputs and initializers: the integer kernels make integer
tensors, DequantizeLinear and ``MatMulIntegerToFloat`` float ones, most other ops keep their first
input's type.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List

#: ops whose output is float whatever their inputs
_FLOAT_OUT = ("DequantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
#: ops whose output is an integer tensor (quantized values, shapes, indices)
_INT_OUT = ("QuantizeLinear", "DynamicQuantizeLinear", "Shape", "Size", "ArgMax", "ArgMin", "NonZero",
            "MatMulInteger", "ConvInteger")
#: ops that only move, copy or reshape data: not listed even on float tensors
_DATA_MOVES = ("Reshape", "Transpose", "Gather", "Unsqueeze", "Squeeze", "Slice", "Split", "Flatten", "Identity",
               "Expand", "Tile", "Constant", "ConstantOfShape", "Cast", "If", "Range")

#: op -> why it stays float (the rule table of :mod:`qgait_plugin.quant.placement` and onnxruntime's kernels)
REASONS: Dict[str, str] = {}
for _ops, _why in (
    (("Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "NhwcConv"),
     "a float conv/matmul: the layer is not quantized (quant.overrides, last_layer: fp) or its quantizers do not "
     "form the pattern onnxruntime fuses (see the incomplete integer patterns)"),
    (("ReduceMean", "GlobalAveragePool", "AveragePool"),
     "mean pooling (horizontal pyramid or GeM mean) on dequantized values: a float boundary of the placement rules"),
    (("Pow", "Sqrt", "Div", "ReduceL2", "ReduceSum", "LpNormalization", "Softmax", "Exp", "Log", "Erf", "Reciprocal"),
     "GeM's power, normalisation or softmax: float by the placement rules (no integer form)"),
    (("ReduceMax", "MaxPool", "GlobalMaxPool", "Max", "Min"),
     "max over dequantized values of one scale (value-exact; onnxruntime has no integer kernel for it here)"),
    (("Mul", "Add", "Sub"),
     "element-wise on a float tensor: the per-part FC's step scale after MatMulIntegerToFloat, or an add/mul "
     "with an input the placement left float"),
    (("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"),
     "a normalisation that was not folded into a conv: a float boundary"),
    (("Concat",), "a concat with a float input: the placement did not quantize every input"),
    (("Relu", "LeakyRelu", "Sigmoid", "Clip", "HardSigmoid", "Tanh"),
     "an activation on a float tensor (its input is not quantized)"),
):
    for _op in _ops:
        REASONS[_op] = _why


def _short(op: str) -> str:
    return op.split(":")[-1]


def float_ops(graph: Any) -> List[Dict[str, Any]]:
    """``[{"op", "count", "reason"}]`` for the ops of ``graph`` (an ``onnx.GraphProto``, e.g.
    :func:`~qgait_plugin.export.runtime.optimized_graph`) that compute on float tensors."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    is_float: Dict[str, bool] = {}
    for t in graph.initializer:
        is_float[t.name] = t.data_type in floats
    for v in list(graph.input) + list(graph.value_info):
        is_float.setdefault(v.name, v.type.tensor_type.elem_type in floats)
    counts: Counter = Counter()
    for n in graph.node:
        op = n.op_type
        if op in _FLOAT_OUT:
            out = True
        elif op in _INT_OUT or op.startswith("QLinear") or op.endswith("Integer"):
            out = False
        elif op == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            out = to in floats
        else:
            data = [i for i in n.input if i]
            out = bool(data) and is_float.get(data[0], False)
            if out and op not in _DATA_MOVES:
                counts[op if n.domain in ("", "ai.onnx") else f"{n.domain}:{op}"] += 1
        for o in n.output:
            is_float[o] = out
    return [{"op": op, "count": c, "reason": REASONS.get(_short(op), "no integer kernel for it in onnxruntime")}
            for op, c in sorted(counts.items())]


def float_ops_line(found: List[Dict[str, Any]]) -> str:
    """One line for the export commands: each float op with its count and reason, or ``none``."""
    if not found:
        return "none"
    by_reason: Dict[str, List[str]] = {}
    for f in found:
        by_reason.setdefault(f["reason"], []).append(f"{f['op']} x{f['count']}")
    return "; ".join(f"{', '.join(ops)} ({why})" for why, ops in by_reason.items())
