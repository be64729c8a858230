"""Every silhouette model of OpenGait's zoo builds, converts at W4A4 with dataflow placement, runs forward +
backward and has >= 95 % of its MACs quantized (skipped without OPENGAIT_ROOT)."""
from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.opengait, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("OPENGAIT_ROOT"),
                                 reason="needs an OpenGait checkout in OPENGAIT_ROOT")]


@pytest.fixture(scope="module")
def og():
    from qgait_plugin.opengait.env import import_opengait
    from qgait_plugin.opengait.registry import register

    og = import_opengait()
    register(og)
    return og


MODELS = ["GaitBase", "DeepGaitV2-2d", "DeepGaitV2-p3d", "DeepGaitV2-3d", "GaitSet", "GaitPart", "GaitGL", "GLN",
          "SwinGait"]


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_quantizes_at_w4a4(og, name):
    import warnings

    from qgait_plugin.opengait.zoo import check_model

    with warnings.catch_warnings(record=True) as caught:  # dataflow placement, as the OpenGait host places
        warnings.simplefilter("always")
        r = check_model(og, name, bits=4, small=True)
    assert not [str(w.message) for w in caught if "dataflow changed" in str(w.message)]
    # what stays float where a quantized tensor enters it is listed with its reason (a mean at least: HPP)
    assert r["report"].stays_float and all(f["reason"] for f in r["report"].stays_float), r["report"].table()
    assert r["quantizers"] > 0
    assert r["steps_with_grad"] == r["quantizers"], f"{name}: some steps got no gradient"
    assert r["quantized_mac_fraction"] >= 0.95, r["report"].table()


def test_fc_handlers_quantize_what_is_multiplied(og):
    """SeparateBNNecks multiplies normalised features by a column-normalised fc_bin: the weight
    quantizer must see the normalised weight (its steps stay below 1) and the logits must sit on
    the product grid of the two quantizers."""
    import torch

    from qgait_plugin import QuantConfig, quantize_model
    from qgait_plugin.quant.quantizer import STEP_EPS

    neck = og.modules.SeparateBNNecks(parts_num=2, in_channels=8, class_num=5)
    fcs = og.modules.SeparateFCs(parts_num=2, in_channels=8, out_channels=8)
    net = torch.nn.Sequential(fcs, neck)
    with torch.no_grad():
        neck.fc_bin.mul_(50.0)  # raw weights far from unit norm
    quantize_model(net, QuantConfig.from_dict({"weight": {"bits": 4}, "act": {"bits": 4}, "first_layer_act": True}))
    x = torch.randn(6, 8, 2)
    feat, logits = neck(fcs(x))
    assert float(neck.weight_quant.step.detach().max()) < 1.0
    assert torch.allclose(feat.norm(dim=1), torch.ones(6, 2), atol=1e-5)
    w = neck.quantized_weight  # [p, c, classes]
    grid = w / neck.weight_quant.step.clamp_min(STEP_EPS)
    assert torch.allclose(grid, grid.round(), atol=1e-4) and float(grid.abs().max()) <= 7 + 1e-4
