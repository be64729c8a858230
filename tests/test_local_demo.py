"""``qgait demo --quick`` end to end: every method and condition reaches results.json, plots are written."""
import json
import math

import pytest
from conftest import INT8_EXACT, w8_cosine_floor

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
    # stored bit widths shrink the model: fp32 > W8 > W3
    assert m["fp"]["size_bytes"] > m["w8a8_lsq"]["size_bytes"] > m["w3a3_lsq"]["size_bytes"]
    assert m["w8a8_lsq"]["size_bytes"] == m["w8a8_qgait"]["size_bytes"]
    # LSQ and QGait get the same iteration budget
    assert m["w3a3_lsq"]["iterations"] == m["w3a3_qgait"]["iterations"]
    for png in ("accuracy.png", "distances.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000
    assert "| w3a3_qgait |" in (out / "results.md").read_text()
    assert "| w3a3_qgait |" in capsys.readouterr().out
    # the demo ends by deploying: integer ONNX per quantized model, agreeing with PyTorch (local/deploy.py)
    dep = json.loads((out / "deploy" / "deploy.json").read_text())
    assert set(dep) == set(METHODS) and all(d["cosine_min"] >= w8_cosine_floor(8) for d in dep.values())
    # W8 on AVX2-only CPUs: onnxruntime's u8s8 kernels saturate (tests/conftest.py), a near-tie may flip
    assert all(d["rank1_runtime"] == d["rank1_torch"] for m, d in dep.items() if INT8_EXACT or "w8" not in m)

    # the ablation reruns QAT variants from the finished demo's data and FP checkpoint
    assert main(["ablate", "--demo-dir", str(out), "--bits", "3", "--variants", "lsq,two_phase", "--iters", "2",
                 "--quick", "--no-progress"]) == 0
    abl = json.loads((out / "ablation_w3.json").read_text())
    assert abl["bits"] == 3 and set(abl["results"]) == {"lsq", "two_phase"}
    assert all(r["iterations"] == 2 for r in abl["results"].values())
    assert "| two_phase |" in capsys.readouterr().out
    assert main(["ablate", "--demo-dir", str(tmp_path / "missing")]) == 2


def test_what_one_run_shows_pairs_subjects_and_names_the_gap():
    from qgait_plugin.local.demo import what_one_run_shows

    def run(mean, per, bits):
        return {"rank1": {"mean": mean}, "weight_bits": bits, "subject_rank1": per}

    per_lsq = {"001": 50.0, "002": 60.0, "003": 70.0}
    per_qg = {"001": 52.0, "002": 63.0, "003": 71.0, "004": 99.0}  # 004 has no LSQ score: not paired
    text = what_one_run_shows({"fp": run(70.0, {}, 32), "w3a3_lsq": run(65.5, per_lsq, 3),
                               "w3a3_qgait": run(66.0, per_qg, 3)})
    assert "W3A3: LSQ -4.5 and QGait -4.0 points" in text
    # differences +2, +3, +1 over the 3 shared subjects: mean +2.00, t(0.975, 2) * 1/sqrt(3) = 2.48
    assert "QGait - LSQ +2.00 [-0.48, +4.48] over 3 test subjects" in text
    assert "not the training seed" in text
