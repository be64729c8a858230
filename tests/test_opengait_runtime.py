"""The CPU checks of the OpenGait host and the dotted-key helper they use (no OpenGait needed)."""
from __future__ import annotations

import copy

import pytest

from qgait_plugin.opengait.dotted import get_dotted, set_dotted
from qgait_plugin.opengait.runtime import apply_cpu_overrides, cpu_config_problems


def test_get_and_set_dotted():
    d = {"a": {"b": {"c": 1}}, "x": 2}
    assert get_dotted(d, "a.b.c") == 1 and get_dotted(d, "a.b") == {"c": 1}
    assert get_dotted(d, "a.z.c") is None and get_dotted(d, "x.y", "none") == "none"
    set_dotted(d, "a.b.c", 3)
    set_dotted(d, "n.m", 4)  # missing mappings are made
    assert d == {"a": {"b": {"c": 3}}, "x": 2, "n": {"m": 4}}
    with pytest.raises(TypeError, match="x.y: 'x' holds a int"):
        set_dotted(d, "x.y", 5)


def test_cpu_problems_and_their_overrides():
    cfg = {"trainer_cfg": {"sync_BN": True, "enable_float16": True, "with_test": True},
           "evaluator_cfg": {"enable_float16": False, "sampler": {"batch_size": 4}}}
    probs = cpu_config_problems(cfg, world_size=1, training=True)
    # enable_float16 is no problem: the CPU runtime maps OpenGait's CUDA autocast to CPU bfloat16
    assert [p.key for p in probs] == ["trainer_cfg.sync_BN", "evaluator_cfg.sampler.batch_size"]
    assert "evaluator_cfg.sampler.batch_size: is 4, needs 1 on CPU" in str(probs[-1])
    fixed = copy.deepcopy(cfg)
    apply_cpu_overrides(fixed, probs)
    assert cpu_config_problems(fixed, world_size=1, training=True) == []
    assert fixed["evaluator_cfg"]["sampler"]["batch_size"] == 1 and fixed["trainer_cfg"]["sync_BN"] is False
    assert cpu_config_problems({}, world_size=1, training=False)[0].key == "evaluator_cfg.sampler.batch_size"
