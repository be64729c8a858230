"""The QGait configs for OpenGait (configs/opengait) all validate (runs everywhere; with
OPENGAIT_ROOT also against the checkout's default config and model lookup)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from qgait_plugin.config import QuantConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "opengait"
EXPECTED = {f"{m}_{d}_w{b}a{b}.yaml" for m, ds in (("gaitbase", ("casiab", "oumvlp", "grew", "gait3d")),
                                                   ("deepgaitv2", ("casiab", "grew", "gait3d")))
            for d in ds for b in (8, 4)}
SECTIONS = ("data_cfg", "evaluator_cfg", "loss_cfg", "model_cfg", "optimizer_cfg", "scheduler_cfg", "trainer_cfg",
            "quant")
DATASETS = {"casiab": "CASIA-B", "oumvlp": "OUMVLP", "grew": "GREW", "gait3d": "Gait3D"}


def _load(name):
    return yaml.safe_load((CONFIG_DIR / name).read_text())


def test_every_model_dataset_bits_combination_is_there():
    assert {p.name for p in CONFIG_DIR.glob("*.yaml")} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_validates(name):
    cfg = _load(name)
    assert set(SECTIONS) <= set(cfg), f"{name}: missing {set(SECTIONS) - set(cfg)}"
    q = QuantConfig.from_dict(cfg["quant"])
    bits = int(name.rsplit("_w", 1)[1][0])
    assert (q.weight.bits, q.act.bits) == (bits, bits)
    model, ds = name.split("_")[:2]
    assert cfg["model_cfg"]["model"] == {"gaitbase": "Baseline", "deepgaitv2": "DeepGaitV2"}[model]
    assert cfg["data_cfg"]["dataset_name"] == DATASETS[ds]
    t, e = cfg["trainer_cfg"], cfg["evaluator_cfg"]
    assert t["total_iter"] == q.schedule.ste_iters + q.schedule.soft_iters and q.schedule.soft_iters > 0
    assert e["restore_hint"] == t["total_iter"] and e["save_name"] == t["save_name"]
    assert q.idd.enabled and q.init_from and q.init_from.endswith(".pt")
    assert all(m < q.schedule.ste_iters for m in cfg["scheduler_cfg"]["milestones"])


@pytest.mark.opengait
@pytest.mark.skipif(not os.environ.get("OPENGAIT_ROOT"), reason="needs an OpenGait checkout in OPENGAIT_ROOT")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_keys_are_opengaits(name):
    """Every key our configs set exists in OpenGait's default config (or is ``quant``) and the
    model and loss types resolve in its lookups, so OpenGait reads them as written."""
    root = Path(os.environ["OPENGAIT_ROOT"])
    default = yaml.safe_load((root / "configs" / "default.yaml").read_text())
    cfg = _load(name)
    assert set(cfg) - {"quant"} <= set(default)
    for sec in ("trainer_cfg", "evaluator_cfg"):
        unknown = set(cfg[sec]) - set(default[sec]) - {"eval_func", "metric", "cross_view_gallery"}
        assert not unknown, f"{name}: {sec} keys {unknown} are not OpenGait's"
    from qgait_plugin.opengait.env import import_opengait

    og = import_opengait(str(root))
    assert hasattr(og.models, cfg["model_cfg"]["model"])
    assert all(hasattr(og.losses, loss["type"]) for loss in cfg["loss_cfg"])
