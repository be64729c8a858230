"""The LSQ quantizer: values on the grid, LSQ gradients, initialisation and saved state."""
import math

import pytest
import torch

from qgait_plugin import ConfigError, LSQQuantizer, QuantizerSpec, fake_quantize
from qgait_plugin.quant.quantizer import STEP_LOG_SCALE, qrange


def _on_grid(out, step, qmin, qmax):
    q = out / step
    assert torch.allclose(q, torch.round(q), atol=1e-4), "values off the integer grid"
    assert q.min() >= qmin - 1e-4 and q.max() <= qmax + 1e-4, "values outside the clamp range"


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_outputs_lie_on_grid(bits, per_channel):
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 3, 6).view(6, 1, 1, 1)
    q = LSQQuantizer(bits, "weight", channel_shape=(6, 1, 1, 1) if per_channel else None)
    out = q(w)
    qmin, qmax = qrange(bits, True)
    assert (qmin, qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    _on_grid(out, q.step.detach(), qmin, qmax)
    levels = (out / q.step.detach()).round().unique().numel()
    assert levels <= qmax - qmin + 1 and levels >= min(3, qmax - qmin + 1)
    if per_channel:  # channels with 30x different scales get different steps
        assert q.step[0] < q.step[-1] / 5


@pytest.mark.parametrize("bits", range(2, 9))
def test_activation_signedness_and_grid(bits):
    relu_in = torch.relu(torch.randn(8, 16))
    q = LSQQuantizer(bits, "act").train()
    out = q(relu_in)
    assert q.signed is False and q.qmin == 0 and q.qmax == 2**bits - 1
    _on_grid(out, q.step.detach(), 0, 2**bits - 1)
    q2 = LSQQuantizer(bits, "act").train()
    out2 = q2(torch.randn(8, 16))
    assert q2.signed is True
    _on_grid(out2, q2.step.detach(), *qrange(bits, True))


def test_lsq_gradients_match_formula():
    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 1.3, 9.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    qmin, qmax = -3, 3
    fake_quantize(x, s, qmin, qmax, rounding="ste").sum().backward()
    v = x.detach() / 0.5
    inside = (v >= qmin) & (v <= qmax)
    expected_s = torch.where(inside, torch.round(v) - v, torch.clamp(v, qmin, qmax)).sum()
    assert torch.isclose(s.grad, expected_s)
    assert torch.equal(x.grad, inside.double())


def test_module_applies_lsq_gradient_scale():
    w = torch.randn(4, 8, dtype=torch.float64)
    q = LSQQuantizer(4, "weight", channel_shape=(4, 1)).double()
    q(w)  # initialise
    s = q.step.clone()
    q.scaled_log_step.grad = None
    q(w).sum().backward()
    v = torch.clamp(w / s, -7, 7)
    inside = (w / s >= -7) & (w / s <= 7)
    raw = torch.where(inside, torch.round(v) - w / s, v).sum(dim=1, keepdim=True)
    g = 1 / math.sqrt(8 * 7)
    # theta = ln(s) / STEP_LOG_SCALE receives LSQ's scaled step gradient g dL/ds / STEP_LOG_SCALE (not
    # the chain rule's s g dL/ds): SGD on theta is LSQ's SGD on s with a learning rate proportional to s
    torch.testing.assert_close(q.scaled_log_step.grad, raw * g / STEP_LOG_SCALE)


def test_step_stays_positive_and_init_is_data_driven():
    x = torch.rand(32, 100) * 4
    q = LSQQuantizer(8, "act").train()
    q(x)
    assert bool(q.initialized) and 0 < q.step.item() <= 4 / 255 * 1.01
    with torch.no_grad():
        q.scaled_log_step.fill_(-80.0)  # far below the floor: the step is clamped, nothing divides by zero
    out = q(x)
    assert torch.isfinite(out).all() and (out >= 0).all()
    with pytest.raises(ValueError, match="finite and positive"):
        q.set_step(torch.tensor(-1.0))


def test_uninitialised_activation_in_eval_raises():
    q = LSQQuantizer(4, "act").eval()
    with pytest.raises(RuntimeError, match="before initialisation"):
        q(torch.rand(2, 3))


def test_bits_32_is_identity_and_takes_no_gradient():
    q = LSQQuantizer(32, "act")
    x = torch.randn(3, 5)
    assert q(x) is x and not q.scaled_log_step.requires_grad


def test_extra_state_round_trip_and_mismatch_error():
    q = LSQQuantizer(4, "act").train()
    q(torch.randn(4, 4))
    q.rounding, q.alpha = "soft", 5.5
    sd = q.state_dict()
    r = LSQQuantizer(4, "act")
    r.load_state_dict(sd)
    assert (r.rounding, r.alpha, r.signed, bool(r.initialized)) == ("soft", 5.5, True, True)
    assert torch.equal(r.step, q.step)
    with pytest.raises(ValueError, match="4-bit act quantizer where the model has a 8-bit"):
        LSQQuantizer(8, "act").load_state_dict(sd)


def test_invalid_bits_rejected():
    for bits in (1, 9, 16):
        with pytest.raises(ConfigError, match=rf"bits: {bits} is not a supported bit width; allowed: 2\.\.8, or 32"):
            LSQQuantizer(bits, "weight")


@pytest.mark.parametrize("spec", [
    QuantizerSpec("weight", 4, per_channel=True, rounding="soft", alpha=5.0),
    QuantizerSpec("weight", 8),
    QuantizerSpec("act", 3, signed=False, rounding="soft", soft_forward=True),
    QuantizerSpec("act", 32),
])
def test_from_spec_round_trip(spec):
    q = LSQQuantizer.from_spec(spec, channel_shape=(6, 1, 1, 1))
    assert q.spec == spec
    assert q.per_channel == spec.per_channel and q.enabled == spec.enabled
    assert q.signed == (spec.signed if spec.kind == "act" else True)
    assert tuple(q.step.shape) == ((6, 1, 1, 1) if spec.per_channel else ())
    # the state dict restores the same spec into a quantizer built from it
    r = LSQQuantizer.from_spec(spec, channel_shape=(6, 1, 1, 1))
    r.load_state_dict(q.state_dict())
    assert r.spec == spec


def test_from_spec_needs_the_channel_shape_of_a_per_channel_spec():
    with pytest.raises(ValueError, match="channel_shape"):
        LSQQuantizer.from_spec(QuantizerSpec("weight", 4, per_channel=True))


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="bias", bits=8), r"QuantizerSpec\.kind: 'bias' is not allowed; choose one of \['weight', 'act'\]"),
    (dict(kind="act", bits=12), r"QuantizerSpec\.bits: 12 is not a supported bit width"),
    (dict(kind="act", bits=True), r"QuantizerSpec\.bits: True is not a supported bit width"),
    (dict(kind="act", bits=4, rounding="hard"),
     r"QuantizerSpec\.rounding: 'hard' is not allowed; choose one of \['ste', 'soft'\]"),
    (dict(kind="act", bits=4, alpha=0), r"QuantizerSpec\.alpha: 0\.0 must be > 0"),
    (dict(kind="act", bits=4, alpha=250.0), r"QuantizerSpec\.alpha: 250\.0 is too large"),
    (dict(kind="act", bits=4, signed="yes"), r"QuantizerSpec\.signed: 'yes' is not allowed"),
    (dict(kind="weight", bits=4, signed=False), r"QuantizerSpec\.signed: False is not allowed for a weight"),
    (dict(kind="act", bits=4, per_channel=True), r"QuantizerSpec\.per_channel: True is not allowed for an activation"),
])
def test_spec_validation_names_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantizerSpec(**kwargs)


def test_fake_quantize_names_an_unknown_rounding_mode():
    with pytest.raises(ConfigError, match=r"fake_quantize rounding: 'nearest' is not allowed"):
        fake_quantize(torch.randn(3), torch.tensor(0.1), -7, 7, rounding="nearest")


def test_collapsed_steps_names_quantizers_whose_step_sits_at_the_floor():
    from qgait_plugin.quant.quantizer import collapsed_steps

    net = torch.nn.ModuleDict({"a": LSQQuantizer(8, signed=True, kind="weight", channel_shape=(4, 1)),
                               "b": LSQQuantizer(8, signed=True, kind="weight", channel_shape=(4, 1))})
    x = torch.randn(4, 3)
    for q in net.values():
        q(x)  # initialises from data
    assert collapsed_steps(net) == {}
    with torch.no_grad():
        net["b"].scaled_log_step[1:3] = -40.0  # driven far below the STEP_EPS floor on two channels
    assert collapsed_steps(net) == {"b": 2}
    # and the forward pass really quantizes those channels to ~0, which is why it is reported
    out = net["b"](x)
    assert out[1:3].abs().max() < 1e-5 and out[0].abs().max() > 0.1


@pytest.mark.parametrize("kwargs, match", [
    ({"qmin": 7, "qmax": -7}, "qmin <= qmax"),  # returned a constant for every element before
    ({"step": torch.tensor(float("nan"))}, "finite and positive"),
    ({"step": torch.tensor(float("inf"))}, "finite and positive"),
    ({"step": torch.tensor([0.1, 0.0])}, "finite and positive"),
    ({"step": torch.tensor(-0.1)}, "finite and positive"),
    ({"alpha": -1.0}, "alpha"),
])
def test_fake_quantize_refuses_arguments_outside_its_rules(kwargs, match):
    args = {"x": torch.randn(2, 3), "step": torch.tensor(0.1), "qmin": -7, "qmax": 7}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fake_quantize(args.pop("x"), args.pop("step"), args.pop("qmin"), args.pop("qmax"), **args)


def test_ddp_over_gloo_broadcasts_every_quantizer_buffer(tmp_path):
    """DDP broadcasts buffers when it wraps a model; torch 1.13's gloo has no bool, so every buffer
    must be a type gloo carries. A checkpoint from when ``initialized`` was a bool still loads."""
    import torch.distributed as dist
    from torch import nn

    from qgait_plugin import quantize_model

    q = LSQQuantizer(4, "act")
    old = {k: (v.to(torch.bool) if k == "initialized" else v) for k, v in q.state_dict().items()}
    old["initialized"] = torch.ones((), dtype=torch.bool)
    q.load_state_dict(old)
    assert bool(q.initialized)
    net = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), {"weight": {"bits": 4}})
    net(torch.rand(3, 4))
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        nn.parallel.DistributedDataParallel(net)(torch.rand(3, 4)).sum().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_evaluation_without_autograd_computes_the_same_values(dtype, per_channel):
    """Under ``no_grad`` the fake quantizer takes an in-place path (no saved tensors): bit for bit the
    values of the autograd path, including clamped values and exact ties."""
    q = LSQQuantizer(4, "weight", channel_shape=(6, 1, 1, 1) if per_channel else None)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 3, 6).view(6, 1, 1, 1)
    q(w)  # the step from the weights
    step = q.effective_step()
    ties = (torch.randint(-9, 9, (6, 3, 3, 3)).float() + 0.5) * step  # exact half-step ties, some clamped
    x = torch.cat([w * 3, ties], dim=-1).to(dtype)  # and values out of range
    q.eval()
    with_grad = q(x.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        without = q(x.clone())
    assert without.dtype == dtype
    assert torch.equal(with_grad, without)
