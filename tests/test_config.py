"""The `quant:` validator: good sections parse, bad ones fail naming the key, value and what is allowed."""
import pytest

from qgait_plugin import ConfigError, QuantConfig

GOOD = {
    "weight": {"bits": 4, "per_channel": True},
    "act": {"bits": 4},
    "overrides": [{"match": "Backbone.*conv1*", "weight_bits": 8, "act_bits": 8},
                  {"match": "BNNecks*", "enabled": False}],
    "init_from": "output/fp.pt",
    "schedule": {"ste_iters": 40000, "soft_iters": 20000, "lr_scale": 0.1, "soft": {"alpha": 3.0, "alpha_end": 6}},
    "idd": {"enabled": True, "weight": 1.0, "criterion": "smooth_l1", "params": "all"},
}


def test_design_example_parses_and_round_trips():
    cfg = QuantConfig.from_dict(GOOD)
    assert cfg.weight.bits == 4 and cfg.act.bits == 4 and cfg.schedule.total_iters == 60000
    assert cfg.schedule.soft.alpha_end == 6.0 and isinstance(cfg.schedule.soft.alpha_end, float)
    assert cfg.overrides[1].enabled is False and cfg.idd.enabled
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults():
    cfg = QuantConfig.from_dict(None)
    got = (cfg.weight.bits, cfg.act.bits, cfg.rounding, cfg.idd.enabled, cfg.last_layer)
    assert got == (8, 8, "ste", False, "same")
    assert QuantConfig.from_dict({"idd": {}}).idd.enabled  # an idd section switches it on


def test_layer_specs_carry_the_whole_section():
    cfg = QuantConfig.from_dict({**GOOD, "act": {"bits": 4, "signed": False}, "rounding": "soft",
                                 "schedule": {"soft": {"alpha": 4.5, "soft_forward": True}}})
    w, a = cfg.layer_specs("Backbone.layer3.conv2", False, False)
    assert (w.kind, w.bits, w.signed, w.per_channel, w.rounding, w.alpha, w.soft_forward) == \
        ("weight", 4, True, True, "soft", 4.5, True)
    assert (a.kind, a.bits, a.signed, a.per_channel, a.rounding) == ("act", 4, False, False, "soft")
    w, a = cfg.layer_specs("BNNecks", False, True)
    assert not w.enabled and not a.enabled
    assert QuantConfig.from_dict({"act": {"signed": "auto"}}).layer_specs("x", False, False)[1].signed is None


def test_layer_bits_precedence():
    cfg = QuantConfig.from_dict({**GOOD, "last_layer": "8"})
    assert cfg.layer_bits("Backbone.layer0.conv1", True, False) == (8, 8)   # override beats first-layer policy
    assert cfg.layer_bits("Backbone.layer3.conv2", True, False) == (4, 32)  # first layer: exact input
    assert cfg.layer_bits("BNNecks", False, True) == (32, 32)
    assert cfg.layer_bits("FCs", False, True) == (8, 8)


BAD = [
    ({"wieght": {"bits": 4}}, r"quant\.wieght: unknown key \(did you mean 'weight'\?\)"),
    ({"weight": {"bits": 9}}, r"quant\.weight\.bits: 9 is not a supported bit width; allowed: 2\.\.8, or 32"),
    ({"weight": {"bits": "4"}}, r"quant\.weight\.bits: expected int, got str '4'"),
    ({"weight": {"bits": True}}, r"quant\.weight\.bits: expected int, got bool True"),
    ({"act": {"bits": 1}}, r"quant\.act\.bits: 1 is not a supported"),
    ({"weight": {"per_channel": "yes"}}, r"quant\.weight\.per_channel: expected bool, got str 'yes'"),
    ({"weight": 4}, r"quant\.weight: expected a mapping"),
    ({"overrides": {"match": "a"}}, r"quant\.overrides: expected a list"),
    ({"overrides": [{"weight_bits": 4}]}, r"quant\.overrides\[0\]\.match: missing"),
    ({"overrides": [{"match": "a*"}]}, r"quant\.overrides\[0\]: override for 'a\*' changes nothing"),
    ({"overrides": [{"match": "a", "bits": 4}]}, r"quant\.overrides\[0\]\.bits: unknown key"),
    ({"schedule": {"ste_iters": -1}}, r"quant\.schedule\.ste_iters: -1 must be >= 0"),
    ({"schedule": {"ste_iters": 10.5}}, r"quant\.schedule\.ste_iters: expected int, got float 10\.5"),
    ({"schedule": {"lr_scale": 0}}, r"quant\.schedule\.lr_scale: 0\.0 must be > 0"),
    ({"schedule": {"soft": {"alpha": 0}}}, r"quant\.schedule\.soft\.alpha: 0\.0 must be > 0"),
    ({"schedule": {"soft": {"alpha": 500}}}, r"quant\.schedule\.soft\.alpha: 500\.0 is too large"),
    ({"schedule": {"soft": {"aplha": 3}}}, r"quant\.schedule\.soft\.aplha: unknown key"),
    ({"idd": {"criterion": "huber"}},
     r"quant\.idd\.criterion: 'huber' is not allowed; choose one of \['smooth_l1', 'l1', 'l2'\]"),
    ({"idd": {"params": "bn"}}, r"quant\.idd\.params: 'bn' is not allowed"),
    ({"idd": {"weight": -1}}, r"quant\.idd\.weight: -1\.0 must be >= 0"),
    ({"rounding": "nearest"}, r"quant\.rounding: 'nearest' is not allowed; choose one of \['ste', 'soft'\]"),
    ({"last_layer": "int8"}, r"quant\.last_layer: 'int8' is not allowed; choose one of \['same', '8', 'fp'\]"),
    ({"init_from": 3}, r"quant\.init_from: expected str, got int 3"),
    ("w4a4", r"quant: expected a mapping"),
    ({"act": {"signed": "maybe"}}, r"quant\.act\.signed: 'maybe' is not allowed"),
    ({"idd": {"phase": "ste"}}, r"quant\.idd\.phase: 'ste' is not allowed; choose one of \['all', 'soft'\]"),
    ({"kd": {"weight": -2}}, r"quant\.kd\.weight: -2\.0 must be >= 0"),
    ({"kd": {"wieght": 2}}, r"quant\.kd\.wieght: unknown key \(did you mean 'weight'\?\)"),
    ({"step_lr_scale": 0}, r"quant\.step_lr_scale: 0\.0 is out of range"),
    ({"step_lr_scale": "fast"}, r"quant\.step_lr_scale: expected float or int, got str"),
]


@pytest.mark.parametrize("section,message", BAD)
def test_bad_input_names_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_dict(section)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_kd_idd_phase_and_step_lr_scale():
    q = QuantConfig.from_dict({"kd": {"weight": 5}, "idd": {"phase": "soft"}, "step_lr_scale": 0.1})
    assert q.kd.enabled and q.kd.weight == 5.0 and q.idd.enabled and q.idd.phase == "soft"
    assert q.step_lr_scale == 0.1
    assert QuantConfig.from_dict(q.to_dict()) == q
    d = QuantConfig.from_dict({})
    assert not d.kd.enabled and d.idd.phase == "all" and d.step_lr_scale == 1.0


def test_opengait_refuses_keys_only_the_builtin_host_carries_out():
    """quant.kd and quant.idd.phase: soft act only in the built-in trainer; an OpenGait run refuses
    them by name instead of ignoring them. The shipped OpenGait configs pass."""
    from pathlib import Path

    import yaml

    from qgait_plugin.opengait.quant_model import refuse_builtin_only_keys

    with pytest.raises(ConfigError, match=r"quant\.kd: .*only on the built-in host"):
        refuse_builtin_only_keys(QuantConfig.from_dict({"kd": {"weight": 1.0}}))
    with pytest.raises(ConfigError, match=r"quant\.idd\.phase: 'soft' .*set phase: all"):
        refuse_builtin_only_keys(QuantConfig.from_dict({"idd": {"phase": "soft"}}))
    shipped = sorted((Path(__file__).resolve().parents[1] / "configs" / "opengait").glob("*.yaml"))
    assert shipped
    for path in shipped:
        refuse_builtin_only_keys(QuantConfig.from_dict(yaml.safe_load(path.read_text())["quant"]))
