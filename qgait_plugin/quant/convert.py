"""``quantize_model``: walk a model and give every handled layer its quantizers, in place.

Also the run-time verbs that act on a whole converted model: switch rounding modes, turn
quantization off (the teacher), list quantizers.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError
from ..spec import FP_BITS, QuantizerSpec, check_alpha, check_rounding
from . import bias, placement
from .blocks import dequantize_blocks, quantize_blocks
from .handlers import LayerHandler, ParamMatmulHandler, find_handler
from .layers import QuantLayerMixin
from .quantizer import LSQQuantizer


def quantizable_layers(model: nn.Module) -> List[Tuple[str, nn.Module, LayerHandler]]:
    """Every module a handler can convert, in registration order (the order of ``named_modules``)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            continue
        h = find_handler(m)
        if h is not None and isinstance(getattr(m, h.param, None), nn.Parameter):
            out.append((name, m, h))
    return out


def _convert_one(m: nn.Module, h: LayerHandler, w_spec: QuantizerSpec, a_spec: QuantizerSpec,
                 exact_input: bool) -> None:
    w = h.weight(m)
    wq = LSQQuantizer.from_spec(w_spec, channel_shape=h.channel_shape(w))
    aq = LSQQuantizer.from_spec(a_spec)
    m.__class__ = h.quant_class(type(m))
    assert isinstance(m, QuantLayerMixin), f"{h!r}: quant_class must give a QuantLayerMixin subclass"
    m.add_module("weight_quant", wq.to(w.device))
    m.add_module("act_quant", aq.to(w.device))
    m.qgait_param = h.param
    m.qgait_exact_input = exact_input


def quantize_model(model: nn.Module, config: QuantConfig | dict | None, example_inputs: Any = None,
                   plan: Optional[placement.Plan] = None,
                   forward_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Convert ``model`` in place for quantization-aware training and return it.

    Layers whose weight and input both resolve to 32 bits (an override with ``enabled: false``,
    ``last_layer: fp``) stay float modules. Steps initialise from data on first use: weights from
    themselves, inputs from the first training batch. An override that matches no layer is an
    error, since it is almost always a typo in the glob.

    With ``quant.residual`` on (the default) the tensors between layers get quantizers too:

    * given ``example_inputs`` (a tensor or a tuple of positional arguments, with
      ``forward_kwargs``), the model runs once on them and the quantizers are placed from its
      dataflow (:mod:`.placement`): every conv, add and concat gets the quantized tensors an
      integer runtime needs, whatever the model's classes. ``plan`` (from a checkpoint,
      :func:`~.placement.plan_from_state_dict`) gives the same placement without running it;
    * without them, registered residual blocks get the quantizers around their adds (:mod:`.blocks`),
      as checkpoints trained before dataflow placement expect.
    A model that already holds quantizers is refused (a second conversion would find nothing left to convert).
    """
    cfg = QuantConfig.from_dict(config) if not isinstance(config, QuantConfig) else config
    done = sum(1 for _ in iter_quantizers(model))
    if done:
        raise ConfigError(f"{type(model).__name__} is already quantized ({done} quantizers); quantize_model converts "
                          "a float model once. Convert a fresh copy of the float model, or call dequantize_model first")
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layer (Conv1d/2d/3d, Linear or a registered type)")
    names = [n for n, _, _ in layers]
    unused = cfg.unused_overrides(names)
    if unused:
        raise ConfigError(f"quant.overrides: match {unused[0].match!r} names no quantizable layer of "
                          f"{type(model).__name__}; layer names look like {names[:4]}")
    for i, (name, m, h) in enumerate(layers):
        is_first, is_last = i == 0, i == len(layers) - 1
        w_spec, a_spec = cfg.layer_specs(name, is_first, is_last)
        if not w_spec.enabled and not a_spec.enabled:
            continue
        _convert_one(m, h, w_spec, a_spec, exact_input=is_first and not a_spec.enabled and not cfg.first_layer_act)
    bias.install(model)  # before the placement's hooks: a BatchNorm's output is rounded, then quantized
    if not cfg.residual.enabled:
        return model
    spec = QuantizerSpec("act", cfg.residual.bits, signed=None, rounding=cfg.rounding,
                         alpha=cfg.schedule.soft.alpha, soft_forward=cfg.schedule.soft.soft_forward)
    if plan is not None:
        _convert_weight_matmuls(model, cfg, plan.weight_matmuls)
        placement.install_placement(model, plan, spec)
    elif example_inputs is not None:
        tr = placement.trace_quiet(model, example_inputs, forward_kwargs)
        found = tr.weight_matmuls(model)
        if _convert_weight_matmuls(model, cfg, found):
            tr = placement.trace_quiet(model, example_inputs, forward_kwargs)
        placement.install_placement(model, placement.make_plan(tr, model, found), spec)
    else:
        quantize_blocks(model, cfg)
    return model


#: what :func:`checkpoint_placement` says of a checkpoint with quantizers but no placement plan
REGISTRY = "registry"


def checkpoint_placement(state_dict: Mapping[str, Any]) -> Union[placement.Plan, str, None]:
    """How the quantized model a state dict was saved from placed its quantizers between layers: its
    :class:`~.placement.Plan` (dataflow placement), :data:`REGISTRY` (quantizers but no plan: trained
    before dataflow placement, with ``quant.residual.placement: registry`` or without residual
    quantizers) or ``None`` (no quantizer state: a full-precision checkpoint)."""
    plan = placement.plan_from_state_dict(dict(state_dict))
    if plan is not None:
        return plan
    if any(k.endswith(".scaled_log_step") for k in state_dict):
        return REGISTRY
    return None


def model_placement(model: nn.Module) -> Union[placement.Plan, str, None]:
    """:func:`checkpoint_placement` of a model as it is now (no state dict made)."""
    p = getattr(model, placement.ATTR, None)
    if isinstance(p, placement.Placement):
        return p.plan
    return REGISTRY if is_quantized(model) else None


def quantize_for(model: nn.Module, config: QuantConfig | dict | None, state_dict: Optional[Mapping[str, Any]] = None,
                 example_inputs: Any = None, forward_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """:func:`quantize_model` as a host calls it: so that ``state_dict`` (the checkpoint the model will
    load, if any) fits.

    A checkpoint with a placement plan gives that plan (no trace); one with quantizers but no plan
    (trained before dataflow placement) gives the block-registry placement it was trained with.
    Otherwise (a new run, a full-precision checkpoint) ``quant.residual.placement`` decides:
    ``dataflow`` places from a run on ``example_inputs`` (the block registry when there are none),
    ``registry`` uses the block registry.
    """
    cfg = QuantConfig.from_dict(config) if not isinstance(config, QuantConfig) else config
    found = checkpoint_placement(state_dict) if state_dict is not None else None
    if isinstance(found, placement.Plan):
        return quantize_model(model, cfg, plan=found)
    if found == REGISTRY or cfg.residual.placement == REGISTRY:
        return quantize_model(model, cfg)
    return quantize_model(model, cfg, example_inputs=example_inputs, forward_kwargs=forward_kwargs)


def requantize_for(model: nn.Module, config: QuantConfig | dict | None, state_dict: Mapping[str, Any]) -> bool:
    """Convert ``model`` (already quantized) again when the checkpoint ``state_dict`` placed its
    quantizers otherwise, so that it loads; True when it did. A full-precision state dict changes nothing.

    Parameters of the quantizers change: call it before an optimizer is built over them."""
    want = checkpoint_placement(state_dict)
    have = model_placement(model)
    if want is None or have is None or same_placement(want, have):
        return False
    dequantize_model(model)
    quantize_for(model, config, state_dict)
    return True


def same_placement(a: Union[placement.Plan, str], b: Union[placement.Plan, str]) -> bool:
    """Whether two :func:`checkpoint_placement` results describe the same quantizers."""
    if isinstance(a, placement.Plan) and isinstance(b, placement.Plan):
        return a.to_dict() == b.to_dict()
    return a == b


def _convert_weight_matmuls(model: nn.Module, cfg: QuantConfig, found: Sequence[Tuple[str, str]]) -> int:
    """Convert the modules the trace found multiplying by their own raw parameter (nobody registered
    them) like registered ``ParamMatmulHandler`` layers. Returns how many were converted."""
    mods = dict(model.named_modules())
    done = 0
    for name, param in found:
        m = mods.get(name)
        if m is None or isinstance(m, QuantLayerMixin) or not isinstance(getattr(m, param, None), nn.Parameter):
            continue
        w_spec, a_spec = cfg.layer_specs(name, False, False)
        if w_spec.enabled or a_spec.enabled:
            _convert_one(m, ParamMatmulHandler(param=param), w_spec, a_spec, exact_input=False)
            done += 1
    return done


def dequantize_model(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_model` in place: float classes back, quantizers removed (also of a
    quantized model held inside ``model``, e.g. by an export wrapper)."""
    for m in [m for m in model.modules() if isinstance(getattr(m, placement.ATTR, None), placement.Placement)]:
        placement.remove(m)
    dequantize_blocks(model)
    for m in model.modules():
        if isinstance(m, QuantLayerMixin):
            del m.weight_quant
            del m.act_quant
            m.__class__ = m.qgait_float_class
    return model


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (``model`` itself when it is not wrapped)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def iter_quantizers(model: nn.Module) -> Iterator[Tuple[str, LSQQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, LSQQuantizer):
            yield name, m


def quantizer_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The learned step parameters (``log s`` of each quantizer), for optimizer groups and calibration."""
    return [q.scaled_log_step for _, q in iter_quantizers(model)]


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in iter_quantizers(model))


def set_rounding(model: nn.Module, mode: str, alpha: Optional[float] = None) -> nn.Module:
    """Switch every quantizer of ``model`` to ``mode`` (``"ste"`` or ``"soft"``), optionally setting ``alpha``.

    Only the backward pass changes: forward outputs are bit-identical across modes.
    """
    check_rounding(mode, "set_rounding mode")
    if alpha is not None:
        alpha = check_alpha(alpha, "set_rounding alpha")
    for _, q in iter_quantizers(model):
        q.rounding = mode
        if alpha is not None:
            q.alpha = float(alpha)
    return model


def set_quant_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn every quantizer of ``model`` on or off (off gives the float model, e.g. for the teacher)."""
    for _, q in iter_quantizers(model):
        q.enabled = bool(enabled) and q.bits < FP_BITS
    return model
