"""ONNX export of a converted model as a QDQ graph with integer weights.

Torch's default (dynamo) exporter fails on fake-quantize ops, so this uses the TorchScript
exporter (``dynamo=False``), which writes ``torch.fake_quantize_*`` (what the quantizers emit
inside :func:`~qgait_plugin.export.qdq.export_mode`) as QuantizeLinear / DequantizeLinear. A
second pass folds every weight's QuantizeLinear into an int8 initializer, so the file stores
integers (a weight travels as ``int8 -> DequantizeLinear``) and onnxruntime can fuse the pattern
into integer kernels (QLinearConv/MatMulInteger) where the CPU supports them.
Needs the ``export`` extra (onnx, onnxruntime).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..atomic import write_atomic
from .qdq import export_mode


def _fold_weight_quantize(onnx_model: Any) -> int:
    """Replace ``float initializer -> QuantizeLinear`` by an integer initializer. Returns how many."""
    import numpy as np
    from onnx import numpy_helper

    g = onnx_model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    folded = 0
    for node in list(g.node):
        if node.op_type != "QuantizeLinear":
            continue
        w, scale = value(node.input[0]), value(node.input[1])
        zp = value(node.input[2]) if len(node.input) > 2 else None
        if w is None or scale is None or w.ndim == 0:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = scale.size
        zp_arr = zp if zp is not None else np.zeros_like(scale, dtype=np.uint8)
        info = np.iinfo(zp_arr.dtype)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp_arr.reshape(shape).astype(np.int32), info.min, info.max)
        init = numpy_helper.from_array(q.astype(zp_arr.dtype), name=node.output[0] + "_int")
        g.initializer.append(init)
        for other in g.node:  # consumers of the QuantizeLinear output now read the integers
            for i, name in enumerate(other.input):
                if name == node.output[0]:
                    other.input[i] = init.name
        g.node.remove(node)
        folded += 1
    # drop initializers nothing reads any more (the float weights)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return folded


def export_onnx(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str, opset: int = 17,
                input_names: Sequence[str] = ("input",), output_names: Sequence[str] = ("output",),
                dynamic_batch: bool = True, dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None) -> Dict[str, Any]:
    """Export ``model`` (converted, initialised) to ``path``; written atomically. Returns a summary.

    ``dynamic_axes`` (torch's format) replaces the default of a dynamic batch dimension.
    """
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("ONNX export needs the export extra: pip install -e '.[export]'") from e
    args = tuple(example_inputs)
    dyn = dynamic_axes or ({n: {0: "batch"} for n in list(input_names) + list(output_names)} if dynamic_batch else None)
    with export_mode(model), tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # dynamo=False is deliberate (the dynamo exporter fails on fake-quantize ops): no need to warn
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        raw = os.path.join(tmp, "raw.onnx")
        torch.onnx.export(model, args, raw, dynamo=False, opset_version=opset, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dyn, do_constant_folding=True)
        m = onnx.load(raw)
    folded = _fold_weight_quantize(m)
    onnx.checker.check_model(m)
    write_atomic(path, lambda tmp: onnx.save(m, tmp))
    ops: Dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"path": path, "bytes": os.path.getsize(path), "integer_weights": folded, "ops": ops}
