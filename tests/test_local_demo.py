"""``qgait demo --quick`` end to end: every method and condition reaches results.json, plots are written."""
import json
import math

import pytest

from qgait_plugin.cli import main
from qgait_plugin.local.demo import METHODS


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(METHODS)
    for name, r in res["methods"].items():
        for cond in ("NM", "BG", "CL", "mean"):
            assert 0.0 <= r["rank1"][cond] <= 100.0 and not math.isnan(r["rank1"][cond]), (name, cond)
        assert 0.0 <= r["mAP"] <= 100.0
        assert r["size_bytes"] > 0 and r["train_seconds"] > 0
    m = res["methods"]
    # stored bit widths shrink the model: fp32 > W8 > W4
    assert m["fp"]["size_bytes"] > m["w8a8_lsq"]["size_bytes"] > m["w4a4_lsq"]["size_bytes"]
    assert m["w8a8_lsq"]["size_bytes"] == m["w8a8_qgait"]["size_bytes"]
    # LSQ and QGait get the same iteration budget
    assert m["w4a4_lsq"]["iterations"] == m["w4a4_qgait"]["iterations"]
    for png in ("accuracy.png", "distances.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000
    assert "| w4a4_qgait |" in (out / "results.md").read_text()
    assert "| w4a4_qgait |" in capsys.readouterr().out
    # the demo ends by deploying: integer ONNX per quantized model, agreeing with PyTorch (local/deploy.py)
    dep = json.loads((out / "deploy" / "deploy.json").read_text())
    assert set(dep) == set(METHODS) and all(d["cosine_min"] >= 0.9999 for d in dep.values())
    assert all(d["rank1_runtime"] == d["rank1_torch"] for d in dep.values())

    # the ablation reruns QAT variants from the finished demo's data and FP checkpoint
    assert main(["ablate", "--demo-dir", str(out), "--bits", "3", "--variants", "lsq,soft_noidd", "--iters", "2",
                 "--quick", "--no-progress"]) == 0
    abl = json.loads((out / "ablation_w3.json").read_text())
    assert abl["bits"] == 3 and set(abl["results"]) == {"lsq", "soft_noidd"}
    assert all(r["iterations"] == 2 for r in abl["results"].values())
    assert "| soft_noidd |" in capsys.readouterr().out
    assert main(["ablate", "--demo-dir", str(tmp_path / "missing")]) == 2
