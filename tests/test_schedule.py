"""The two-phase schedule: switch point, alpha anneal, one learning-rate scaling, exact resume."""
import copy
import functools
import io
import warnings

import pytest
import torch
from torch import nn

from qgait_plugin import QuantConfig, iter_quantizers, quantize_model
from qgait_plugin.schedule import LR_SCALED_KEY, QGaitSchedule

STE, SOFT, LR, SCALE = 5, 6, 0.2, 0.1


def make_schedule(alpha_end=6.0, soft_iters=SOFT):
    return QGaitSchedule.from_config({"schedule": {"ste_iters": STE, "soft_iters": soft_iters, "lr_scale": SCALE,
                                                   "soft": {"alpha": 2.0, "alpha_end": alpha_end}}})


def tiny_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5))
    return quantize_model(m, {"weight": {"bits": 3}, "act": {"bits": 3}, "first_layer_act": True})


def batch(it):
    g = torch.Generator().manual_seed(1000 + it)
    return torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 5, (8,), generator=g)


def build(scheduler_kind="multistep"):
    model = tiny_model()
    named = list(model.named_parameters())
    opt = torch.optim.SGD([{"params": [p for n, p in named if not n.endswith("_log_step")]},
                           {"params": [p for n, p in named if n.endswith("_log_step")], "lr": LR / 2}],
                          lr=LR, momentum=0.9)
    if scheduler_kind == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, STE + 2], gamma=0.5)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (1 + 0.1 * it))
    return model, opt, sched, make_schedule()


def train(model, opt, sched, schedule, start, stop):
    model.train()
    for it in range(start, stop):
        schedule.apply(it, model, opt, sched)
        x, y = batch(it)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def snapshot(model, opt, schedule):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "lr": [g["lr"] for g in opt.param_groups],
            "rounding": {q.rounding for _, q in iter_quantizers(model)},
            "alpha": {q.alpha for _, q in iter_quantizers(model)},
            "state": schedule.state_dict()}


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_phase_switches_at_ste_iters_and_stays_soft():
    s = make_schedule()
    assert [s.phase(i) for i in range(STE + SOFT + 3)] == ["ste"] * STE + ["soft"] * (SOFT + 3)
    assert s.switch_iteration == STE and s.total_iters == STE + SOFT
    baseline = make_schedule(soft_iters=0)  # the LSQ-STE baseline has no phase 2
    assert {baseline.phase(i) for i in range(50)} == {"ste"} and baseline.switch_iteration is None
    with pytest.raises(ValueError):
        s.phase(-1)


def test_without_a_schedule_the_configured_rounding_stays_and_lr_is_untouched():
    s = QGaitSchedule.from_config({"rounding": "soft", "schedule": {"soft": {"alpha": 5.0}}})
    model, opt, _, _ = build()
    for it in range(4):
        assert s.apply(it, model, opt) == "soft"
    assert {q.rounding for _, q in iter_quantizers(model)} == {"soft"}
    assert {q.alpha for _, q in iter_quantizers(model)} == {5.0}
    assert [g["lr"] for g in opt.param_groups] == [LR, LR / 2]


def test_alpha_anneals_linearly_over_phase_two():
    s = make_schedule(alpha_end=6.0)
    assert s.alpha(0) == s.alpha(STE) == 2.0
    assert s.alpha(STE + SOFT // 2) == pytest.approx(4.0)
    assert s.alpha(STE + SOFT) == s.alpha(STE + SOFT + 100) == 6.0
    const = make_schedule(alpha_end=None)
    assert {const.alpha(i) for i in range(20)} == {2.0}


def test_from_config_accepts_every_form():
    d = {"ste_iters": 7, "soft_iters": 3, "lr_scale": 0.5, "soft": {"alpha": 4}}
    cfg = QuantConfig.from_dict({"schedule": d})
    forms = [d, {"schedule": d}, cfg, cfg.schedule]
    for f in forms:
        s = QGaitSchedule.from_config(f)
        assert (s.ste_iters, s.soft_iters, s.lr_scale, s.alpha_start, s.alpha_end) == (7, 3, 0.5, 4.0, None)
    with pytest.raises(ValueError, match="lr_scale"):
        QGaitSchedule.from_config({"schedule": {"lr_scale": 0}})


def test_apply_switches_rounding_and_scales_lr_exactly_once():
    model, opt, _, s = build()
    base = [g["lr"] for g in opt.param_groups]
    for it in range(STE + SOFT + 4):
        for _ in range(2):  # idempotent: a second call in the same iteration changes nothing
            ph = s.apply(it, model, opt)
        assert ph == s.phase(it)
        assert {q.rounding for _, q in iter_quantizers(model)} == {ph}
        want = base if it < STE else [b * SCALE for b in base]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-12)
        if ph == "soft":
            assert {q.alpha for _, q in iter_quantizers(model)} == {s.alpha(it)}
    assert all(g[LR_SCALED_KEY] for g in opt.param_groups)
    assert s.state_dict()["lr_scaled"] is True


def test_lambda_scheduler_keeps_the_scaled_lr():
    model, opt, sched, s = build("lambda")
    base = list(sched.base_lrs)
    for it in range(STE + 3):
        s.apply(it, model, opt, sched)
        opt.step()
        sched.step()
    # LambdaLR recomputes lr from base_lrs: the switch survives because base_lrs were scaled too
    assert sched.base_lrs == pytest.approx([b * SCALE for b in base])
    want = [b * SCALE / (1 + 0.1 * (STE + 3)) for b in base]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(want)


@functools.cache  # one reference run per setting, shared by the resume tests
def _uninterrupted(kind="multistep", total=STE + SOFT + 3):
    model, opt, sched, s = build(kind)
    train(model, opt, sched, s, 0, total)
    return snapshot(model, opt, s)


RESUME_CASES = ([("multistep", k) for k in (0, 2, STE - 1, STE, STE + 1, STE + SOFT, STE + SOFT + 2)]
                + [("lambda", k) for k in (STE - 1, STE, STE + 1)])


@pytest.mark.parametrize("kind,stop", RESUME_CASES)
def test_resume_at_any_iteration_matches_uninterrupted_run(kind, stop):
    total = STE + SOFT + 3
    ref = _uninterrupted(kind, total)

    model, opt, sched, s = build(kind)
    train(model, opt, sched, s, 0, stop)
    ckpt = roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "schedule": s.state_dict(), "iteration": stop})
    del model, opt, sched, s

    model, opt, sched, s = build(kind)  # fresh objects, as a restarted process builds them
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    s.load_state_dict(ckpt["schedule"])
    train(model, opt, sched, s, ckpt["iteration"], total)  # the host's counter starts at the restored value
    got = snapshot(model, opt, s)

    for n, p in ref["params"].items():
        assert torch.equal(got["params"][n], p), n
    assert got["lr"] == ref["lr"]
    assert got["rounding"] == ref["rounding"] == {"soft"}
    assert got["alpha"] == ref["alpha"] == {6.0}
    assert got["state"] == ref["state"]


def test_resume_without_schedule_state_does_not_scale_twice():
    """The optimizer carries the switch: an old checkpoint without schedule state resumes right."""
    total, stop = STE + SOFT, STE + 2
    ref = _uninterrupted(total=total)
    model, opt, sched, s = build()
    train(model, opt, sched, s, 0, stop)
    ckpt = roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    model, opt, sched, s = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    train(model, opt, sched, s, stop, total)
    assert [g["lr"] for g in opt.param_groups] == ref["lr"]
    for n, p in ref["params"].items():
        assert torch.equal(model.get_parameter(n), p), n


def test_fresh_optimizer_after_the_switch_is_scaled_once():
    model, opt, sched, s = build()
    train(model, opt, sched, s, 0, STE + 1)
    state = s.state_dict()
    model2, opt2, _, s2 = build()
    s2.load_state_dict(state)
    s2.apply(STE + 1, model2, opt2)  # a rebuilt optimizer starts at the base rates: one scaling is due
    s2.apply(STE + 2, model2, opt2)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([LR * SCALE, LR / 2 * SCALE])


def test_load_state_dict_checks_its_input():
    s = make_schedule()
    s.apply(STE, None, None)
    state = copy.deepcopy(s.state_dict())
    other = make_schedule(alpha_end=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other.load_state_dict(state)
    assert any("alpha_end" in str(w.message) for w in caught)
    assert other.last_phase == "soft"
    with pytest.raises(KeyError, match="lr_scaled"):
        other.load_state_dict({"iteration": 3, "phase": "ste", "alpha": 3.0})
    with pytest.raises(ValueError, match="phase"):
        other.load_state_dict(dict(state, phase="hard"))


def test_steps_a_grad_scaler_skips_do_not_advance_the_schedule():
    """OpenGait's train_step returns False without incrementing ``iteration`` when fp16's GradScaler
    skips a step, and the adapter applies the schedule at ``iteration`` after every step: a skipped
    step re-applies the same iteration, so the switch lands on the counted iteration and the learning
    rates are scaled once, however many steps were skipped."""
    model, opt, _, s = build()
    base = [g["lr"] for g in opt.param_groups]
    iteration, calls = 0, 0
    skips = {2, 3, STE - 1, STE, STE + 1}  # step numbers (not iterations) the scaler skips
    seen = []
    while iteration < STE + SOFT:
        calls += 1
        if calls not in skips:  # OpenGait: only a step the scaler took counts
            iteration += 1
        phase = s.apply(iteration, model, opt)
        seen.append((iteration, phase))
        assert phase == ("ste" if iteration < STE else "soft")
        want = base if iteration < STE else [b * SCALE for b in base]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-12)
    assert calls == STE + SOFT + len(skips) and {p for _, p in seen} == {"ste", "soft"}
