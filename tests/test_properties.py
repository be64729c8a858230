"""Property-based tests (hypothesis): random ``quant:`` sections and random quantizer inputs.

* Any ``quant:`` section, however wrong, either builds a valid :class:`QuantConfig` (which survives a
  ``to_dict`` round trip) or raises :class:`ConfigError`: never another exception, never a NaN.
* :func:`fake_quantize` at any shape, bit width (2..8), signedness, step and rounding mode gives
  finite outputs on the grid ``step * integer`` within ``[qmin, qmax]``, and finite gradients.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgait_plugin.config import QUANT_KEYS, QuantConfig
from qgait_plugin.errors import ConfigError
from qgait_plugin.quant.quantizer import fake_quantize, qrange

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: keys a quant: section uses at any depth, so random sections often get past the first check
KEYS = QUANT_KEYS + ("bits", "per_channel", "signed", "match", "weight_bits", "act_bits", "enabled", "ste_iters",
                     "soft_iters", "lr_scale", "soft", "alpha", "alpha_end", "soft_forward", "criterion", "params")
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["ste", "soft", "auto", "true", "8", "fp", "same", "all", "quantizers", "smooth_l1", "l2", "*",
                     "backbone.*", ""]),
    st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers(0, 3)), inner, max_size=4)),
    max_leaves=12)
SECTIONS = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5),
    st.fixed_dictionaries({}, optional={
        "weight": st.fixed_dictionaries({}, optional={"bits": VALUES, "per_channel": VALUES}),
        "act": st.fixed_dictionaries({}, optional={"bits": VALUES, "signed": VALUES}),
        "overrides": st.lists(st.fixed_dictionaries({"match": VALUES}, optional={"weight_bits": VALUES,
                                                                                  "enabled": VALUES}), max_size=2),
        "schedule": st.fixed_dictionaries({}, optional={
            "ste_iters": VALUES, "soft_iters": VALUES, "lr_scale": VALUES,
            "soft": st.fixed_dictionaries({}, optional={"alpha": VALUES, "alpha_end": VALUES})}),
        "idd": st.fixed_dictionaries({}, optional={"enabled": VALUES, "weight": VALUES, "criterion": VALUES,
                                                    "params": VALUES}),
        "rounding": VALUES, "last_layer": VALUES, "first_layer_act": VALUES, "init_from": VALUES}),
    VALUES)


def _floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _floats(v)


@SETTINGS
@given(SECTIONS)
def test_random_quant_sections_build_or_raise_config_error(section):
    try:
        cfg = QuantConfig.from_dict(section)
    except ConfigError as e:
        assert str(e).startswith("quant") and len(str(e)) <= 2000
        return
    d = cfg.to_dict()
    assert all(math.isfinite(v) for v in _floats(d))
    assert QuantConfig.from_dict(d) == cfg


SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@SETTINGS
@given(shape=SHAPES, bits=st.integers(2, 8), signed=st.booleans(), per_channel=st.booleans(),
       rounding=st.sampled_from(["ste", "soft"]), alpha=st.floats(0.1, 100.0),
       log_step=st.floats(-6.0, 3.0), scale=st.floats(1e-3, 1e4), seed=st.integers(0, 2**31 - 1))
def test_quantizer_outputs_lie_on_the_grid_and_gradients_are_finite(shape, bits, signed, per_channel, rounding,
                                                                     alpha, log_step, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).requires_grad_(True)
    if per_channel:
        step_shape = [shape[0]] + [1] * (len(shape) - 1)
        step = (10 ** log_step) * (0.5 + torch.rand(step_shape, generator=g))
    else:
        step = torch.tensor(10 ** log_step)
    step.requires_grad_(True)
    qmin, qmax = qrange(bits, signed)
    out = fake_quantize(x, step, qmin, qmax, rounding=rounding, alpha=alpha, grad_scale=0.5)
    assert out.shape == x.shape and torch.isfinite(out).all()
    s = step.detach().clamp_min(1e-8).expand_as(x)
    levels = out.detach() / s
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.round().min() >= qmin and levels.round().max() <= qmax
    (out * torch.randn(shape, generator=g)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert step.grad is not None and torch.isfinite(step.grad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_float_key_refuses_non_finite(bad):
    for section in ({"schedule": {"lr_scale": bad}}, {"schedule": {"soft": {"alpha": bad}}},
                    {"schedule": {"soft": {"alpha_end": bad}}}, {"idd": {"weight": bad}}):
        with pytest.raises(ConfigError, match="is not a finite number"):
            QuantConfig.from_dict(section)
