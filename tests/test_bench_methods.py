"""The benchmark's methods differ only where they should: same budget, optimizer and LR schedule."""
import pytest

from qgait_plugin.bench.accuracy import qat_overrides
from qgait_plugin.bench.methods import METHODS, quant_section, switch_iteration
from qgait_plugin.config import QuantConfig
from qgait_plugin.errors import ConfigError

QGAIT = {"split": 0.4, "alpha": 2.5, "alpha_end": 6.0, "step_lr_scale": 0.5,
         "idd": {"weight": 3.0, "criterion": "l1", "params": "all", "phase": "soft"}}
KD = {"weight": 7.0}


def _cfg():
    return {"qat": {"iters": 50, "val_every": 25, "sampler": {"batch_size": [4, 2], "frames_num_fixed": 4},
                    "optimizer": {"solver": "Adam", "lr": 1e-3, "weight_decay": 0.0}, "lr_drop": 0.1,
                    "eval_frames": 8},
            "qgait": QGAIT, "kd": KD}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "fp_continued"])
def test_every_quant_section_validates(method):
    q = QuantConfig.from_dict(quant_section(method, 3, 50, QGAIT, KD))
    assert q.weight.bits == q.act.bits == 3
    assert q.schedule.total_iters == 50 and q.schedule.lr_scale == 1.0   # the LR drop is the scheduler's, shared
    assert q.step_lr_scale == 0.5 and q.schedule.soft.alpha == 2.5
    assert q.idd.enabled == (method == "qgait") and q.kd.enabled == (method == "lsq_kd")
    assert q.schedule.soft.soft_forward == (method == "dsq")


def test_schedules_of_the_methods():
    s = {m: QuantConfig.from_dict(quant_section(m, 4, 50, QGAIT, KD)).schedule
         for m in METHODS if m != "fp_continued"}
    assert (s["lsq"].ste_iters, s["lsq"].soft_iters) == (50, 0)
    assert (s["soft_from_start"].ste_iters, s["dsq"].ste_iters) == (0, 0)
    assert (s["two_phase"].ste_iters, s["qgait"].ste_iters) == (20, 20) == (switch_iteration(50, QGAIT),) * 2
    q = QuantConfig.from_dict(quant_section("qgait", 4, 50, QGAIT, KD))
    assert (q.idd.weight, q.idd.criterion, q.idd.phase) == (3.0, "l1", "soft")
    assert QuantConfig.from_dict(quant_section("lsq_kd", 4, 50, QGAIT, KD)).kd.weight == 7.0


def test_only_the_quant_section_differs_between_methods():
    outs = {m: qat_overrides(_cfg(), m, 3, "fp.pt") for m in METHODS}
    shared = {k: v for k, v in outs["lsq"].items() if k != "quant"}
    for m, o in outs.items():
        if m == "fp_continued":
            assert "quant" not in o and o["trainer_cfg"]["restore_hint"] == "fp.pt"
            o = {k: v for k, v in o.items()}
            o["trainer_cfg"] = dict(o["trainer_cfg"], restore_hint=0)
        assert {k: v for k, v in o.items() if k != "quant"} == shared, m
    assert shared["scheduler_cfg"]["milestones"] == [20] and shared["scheduler_cfg"]["gamma"] == 0.1


def test_unknown_method():
    with pytest.raises(ConfigError, match="not one of"):
        quant_section("lsq++", 4, 10, QGAIT, KD)
