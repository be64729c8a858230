"""ONNX export of a converted model as an integer QDQ graph, and of a float model for comparison.

Torch's default (dynamo) exporter fails on fake-quantize ops, so this uses the TorchScript
exporter (``dynamo=False``, ``autograd_inlining=False``) while every quantizer writes its own
nodes (:mod:`.qdq`); the passes of :mod:`.passes` then fold BatchNorm into the quantized convs,
give them int32 biases and move the per-part FC's steps behind its MatMul. The result is the graph
onnxruntime and OpenVINO run in integer kernels; :func:`export_onnx` also lists any quantized op
whose pattern stayed incomplete (``problems``). Needs the ``export`` extra (onnx, onnxruntime).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..atomic import write_atomic
from ..compat import onnx_export_kwargs
from .passes import compact_names, integer_graph, integer_pattern_problems, op_counts
from .qdq import export_mode


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("ONNX export needs the export extra: pip install -e '.[export]'") from e
    return onnx


def _trace(model: nn.Module, args: tuple, path: str, opset: int, input_names: Sequence[str],
           output_names: Sequence[str], dyn: Optional[Dict[str, Dict[int, str]]]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # dynamo=False is deliberate (the dynamo exporter fails on fake-quantize ops): no need to warn
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch 1.13's exporter about its own g.op
        torch.onnx.export(model, args, path, opset_version=opset, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dyn, do_constant_folding=True,
                          **onnx_export_kwargs())


def _axes(input_names: Sequence[str], output_names: Sequence[str], dynamic_batch: bool,
          dynamic_axes: Optional[Dict[str, Dict[int, str]]]) -> Optional[Dict[str, Dict[int, str]]]:
    if dynamic_axes is not None:
        return dynamic_axes
    return {n: {0: "batch"} for n in list(input_names) + list(output_names)} if dynamic_batch else None


def _integer_weights(m: Any) -> int:
    onnx = _onnx()
    small = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(1 for i in m.graph.initializer if i.data_type in small and len(i.dims) >= 2)


CONV_WEIGHTS = ("auto", "int8", "uint8")


def _uint8_weights(choice: str) -> bool:
    from .runtime import cpu_info

    if choice not in CONV_WEIGHTS:
        raise ValueError(f"conv_weights: {choice!r}; choose one of {list(CONV_WEIGHTS)}")
    if choice == "auto":
        flags = cpu_info()["flags"]
        return not (flags.get("AVX-512 VNNI") or flags.get("AVX-VNNI") or flags.get("AMX-INT8"))
    return choice == "uint8"


def export_onnx(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str, opset: int = 17,
                input_names: Sequence[str] = ("input",), output_names: Sequence[str] = ("output",),
                dynamic_batch: bool = True, dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None,
                exact_input: bool = True, conv_weights: str = "auto") -> Dict[str, Any]:
    """Export ``model`` (converted, initialised) as an integer QDQ graph to ``path``, atomically.

    ``conv_weights``: ``"int8"`` (fastest where the CPU has VNNI), ``"uint8"`` (zero point 128:
    exact on x86 CPUs without VNNI, whose uint8 x int8 kernels saturate, at some speed), or
    ``"auto"``: uint8 when the exporting CPU has neither AVX-512 VNNI nor AVX-VNNI. The convs that
    read the exact input always get uint8 weights.

    ``dynamic_axes`` (torch's format) replaces the default of a dynamic batch dimension.
    ``exact_input``: the first layer's unquantized input is written as ``Q(1/255)`` (exact for
    inputs on the ``k / 255`` grid), so the stem runs in int8 too. Returns a summary: ``bytes``,
    ``integer_weights`` (int8 weight tensors), ``ops`` (op counts), ``passes`` (what each graph
    pass changed) and ``problems`` (quantized ops whose integer pattern is incomplete).
    """
    onnx = _onnx()
    dyn = _axes(input_names, output_names, dynamic_batch, dynamic_axes)
    with export_mode(model, exact_input=exact_input), tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        _trace(model, tuple(example_inputs), raw, opset, input_names, output_names, dyn)
        m = onnx.load(raw)
    passes = integer_graph(m, uint8_conv_weights=_uint8_weights(conv_weights))
    problems = integer_pattern_problems(m)  # while the nodes still carry the module paths as names
    compact_names(m)
    onnx.checker.check_model(m)
    write_atomic(path, lambda tmp: onnx.save(m, tmp))
    return {"path": path, "bytes": os.path.getsize(path), "integer_weights": _integer_weights(m),
            "ops": op_counts(m.graph.node), "passes": passes, "problems": problems}


def export_float_onnx(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str, opset: int = 17,
                      input_names: Sequence[str] = ("input",), output_names: Sequence[str] = ("output",),
                      dynamic_batch: bool = True,
                      dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None) -> Dict[str, Any]:
    """Export a float model (eval mode; the exporter folds its BatchNorms) to ``path``, atomically."""
    onnx = _onnx()
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "raw.onnx")
            _trace(model, tuple(example_inputs), raw, opset, input_names, output_names,
                   _axes(input_names, output_names, dynamic_batch, dynamic_axes))
            m = onnx.load(raw)
    finally:
        model.train(was_training)
    write_atomic(path, lambda tmp: onnx.save(m, tmp))
    return {"path": path, "bytes": os.path.getsize(path), "ops": op_counts(m.graph.node)}
