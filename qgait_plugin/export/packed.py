"""A bit-packed checkpoint: quantized weights stored as ``bits``-wide integers, the rest as floats.

ONNX has no container narrower than 8 bits that onnxruntime runs, so this is where a 4-bit model
actually takes 4 bits per weight on disk. Loading puts ``integer * step`` back into the weights
of a model converted with the same ``quant:`` section: quantizing them again gives the same
integers, so the loaded model computes exactly what was saved.

The file is a ``torch.save`` zip archive written and read through :mod:`qgait_plugin.checkpoint`,
so every member's CRC is checked on load: a flipped bit in the packed integers is refused, naming
the file and the member, instead of loading as slightly different weights.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from ..quant.layers import QuantLayerMixin

FORMAT = "qgait-packed-v1"


class PackedError(CheckpointError, ValueError):
    """A packed file that is not one, or that does not fit the model it is loaded into."""


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2**bits -> a uint8 stream of ``ceil(n * bits / 8)`` bytes (little-endian bit order)."""
    v = np.ascontiguousarray(values.reshape(-1).astype(np.uint8))
    planes = np.unpackbits(v[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
    return np.packbits(np.pad(planes, ((0, 0), (0, 8 - bits))), axis=1, bitorder="little").reshape(-1)


def _integers(m: QuantLayerMixin) -> torch.Tensor:
    """The integers ``round(clamp(w / s))`` the deployed layer ``m`` stores for its weight."""
    wq = m.weight_quant
    qmin, qmax = wq.qrange_now()
    return torch.clamp(torch.round(getattr(m, m.qgait_param).detach() / wq.effective_step()), qmin, qmax)


def _quantized_layers(model: nn.Module) -> Dict[str, QuantLayerMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin) and m.weight_quant.enabled}


def save_packed(model: nn.Module, path: str) -> int:
    """Write ``model`` (converted, initialised) to ``path`` atomically; returns the file size in bytes."""
    layers: Dict[str, Any] = {}
    skip = set()
    for name, m in _quantized_layers(model).items():
        wq = m.weight_quant
        if not bool(wq.initialized):
            raise RuntimeError(f"{name}: weight quantizer never initialised; run the model once before saving")
        w = getattr(m, m.qgait_param)
        ints = _integers(m).to(torch.int64) - wq.qmin  # shift to 0..qmax-qmin
        layers[name] = {"bits": wq.bits, "shape": list(w.shape), "qmin": wq.qmin,
                        "data": torch.from_numpy(pack_bits(ints.cpu().numpy(), wq.bits))}
        skip.add(f"{name}.{m.qgait_param}" if name else m.qgait_param)
    rest = {k: v for k, v in model.state_dict().items() if k not in skip}
    write_checkpoint({"format": FORMAT, "layers": layers, "state": rest}, path)
    return os.path.getsize(path)


@torch.no_grad()
def load_packed(model: nn.Module, path: str, config: Any = None) -> nn.Module:
    """Load a packed checkpoint into ``model``, converted with the same ``quant:`` section.

    When the file's quantizers between layers were placed otherwise than ``model``'s (dataflow
    placement against the block registry, or another plan), ``model`` is converted again to match
    given the ``quant:`` section ``config``, and refused without it. A damaged file (CRC), another
    format or other layers are a :class:`CheckpointError` naming ``path``."""
    from ..quant.convert import checkpoint_placement, model_placement, requantize_for, same_placement

    blob = read_checkpoint(path, "packed file")
    if blob.get("format") != FORMAT:
        raise PackedError(f"{path}: not a {FORMAT} file (format {blob.get('format')!r})")
    want, have = checkpoint_placement(blob["state"]), model_placement(model)
    if want is not None and have is not None and not same_placement(want, have):
        if config is None:
            raise PackedError(f"{path}: its quantizers between layers are placed otherwise than the model's; pass "
                              "the quant: section (load_packed(model, path, config)) to convert the model to match")
        requantize_for(model, config, blob["state"])
    model.load_state_dict(blob["state"], strict=False)
    layers = _quantized_layers(model)
    missing = sorted(set(layers) - set(blob["layers"]))
    extra = sorted(set(blob["layers"]) - set(layers))
    if missing or extra:
        raise PackedError(f"{path}: quantized layers differ from the model's (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); convert the model with the quant config it was saved with")
    for name, entry in blob["layers"].items():
        m = layers[name]
        w = getattr(m, m.qgait_param)
        if list(w.shape) != entry["shape"] or m.weight_quant.bits != entry["bits"]:
            raise PackedError(f"{path}: {name} holds {entry['bits']}-bit {entry['shape']}, the model has "
                             f"{m.weight_quant.bits}-bit {list(w.shape)}")
        ints = unpack_bits(entry["data"].numpy(), entry["bits"], w.numel()).astype(np.int64) + entry["qmin"]
        q = torch.from_numpy(ints).reshape(w.shape).to(w.dtype)
        w.copy_(q * m.weight_quant.effective_step().to(w.dtype))
    return model
