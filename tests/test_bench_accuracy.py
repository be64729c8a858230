"""`qgait bench accuracy --quick`, `qgait bench tune` and `qgait diagnose` end to end on tiny data.

The quick benchmark runs every method at every bit width for every seed of its config; the
assertions check the JSON has all of them, that the tables and intervals are built from them, and
that tuning reads the validation subjects only.
"""
import json
import warnings

import pytest

from qgait_plugin.bench.methods import METHODS, PTQ_METHODS
from qgait_plugin.cli import main


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out, cache = root / "out", root / "cache"
    assert main(["bench", "accuracy", "--quick", "--out", str(out), "--cache", str(cache), "--no-progress"]) == 0
    return out, cache


def test_quick_benchmark_has_every_method_bits_and_seed(bench):
    out, _ = bench
    res = json.loads((out / "results.json").read_text())
    cfg = res["meta"]["config"]
    seeds, bits = cfg["qat"]["seeds"], cfg["qat"]["bits"]
    runs = {(r["method"], r["bits"], r["seed"]) for r in res["runs"]}
    expected = {(m, 32 if m == "fp_continued" else b, s) for m in METHODS for b in bits for s in seeds}
    # the PTQ methods (the calibration draw is the seed) and the FP checkpoint itself, evaluated once
    assert cfg["ptq"]["methods"] == ["fp", *PTQ_METHODS]
    expected |= {(m, b, s) for m in PTQ_METHODS for b in bits for s in seeds} | {("fp", 32, seeds[0])}
    assert runs == expected
    for r in res["runs"]:
        assert r["final_split"] == "TEST_SET" and r["wall_seconds"] > 0
        assert bool(r["val_history"]) == (r["kind"] == "qat")
        assert set(r["rank1"]) == {"NM", "BG", "CL", "mean"}
    table = res["summary"]["table"]
    assert set(table) == {f"W{b}A{b}" for b in bits}
    for rows in table.values():
        assert set(rows) == set(METHODS) | set(PTQ_METHODS) | {"fp"}
        for m, row in rows.items():
            assert row["seeds"] == ([seeds[0]] if m == "fp" else sorted(seeds))
            if m != "lsq":
                vs = row["vs_lsq"]
                assert vs["low"] <= vs["mean"] <= vs["high"] and vs["seeds"] == (1 if m == "fp" else len(seeds))
            if m in PTQ_METHODS and m != "ptq":  # each objective against plain PTQ, paired on the calibration draw
                assert row["vs_ptq"]["low"] <= row["vs_ptq"]["mean"] <= row["vs_ptq"]["high"]
    assert res["meta"]["timings_seconds"]["ptq_runs"] > 0
    assert set(res["summary"]["ptq_floors"]) == {"W8A8_ptq", "W4A4_objectives"}
    assert set(res["summary"]["floors"]) == set(table)
    for name in ("results.md", "accuracy.png", "paired.png", "curves.png", "fp_curve.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "### W4A4: post-training quantization" in md and "| ptq_idc |" in md and "### PTQ floors" in md
    assert all(f"| {r['name']} | {r['rank1']['mean']:.1f} |" in md for r in res["runs"])  # every run, its wall time
    assert res["meta"]["fp_reference"]["curve"]


def test_rerun_reuses_finished_runs(bench, capsys):
    out, cache = bench
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert main(["bench", "accuracy", "--quick", "--out", str(out), "--cache", str(cache), "--no-progress"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert before == after     # every record matched its config: nothing trained again


def test_tune_reads_validation_only(bench, tmp_path):
    _, cache = bench
    grid = tmp_path / "grid.yaml"
    grid.write_text("bits: 4\nseeds: [0]\ncandidates:\n  - {name: base, methods: [lsq]}\n"
                    "  - {name: strong_idd, qgait: {idd: {criterion: l1, weight: 3.0}}}\n")
    out = tmp_path / "tune"
    assert main(["bench", "tune", "--quick", "--grid", str(grid), "--out", str(out), "--cache", str(cache),
                 "--no-progress"]) == 0
    log = json.loads((out / "tune_log.json").read_text())
    assert log["split"] == "VAL_SET" and log["runs"] == 2
    rows = {r["candidate"]: r for r in log["rows"]}
    assert rows["strong_idd"]["vs_lsq"] is not None and rows["base"]["method"] == "lsq"
    for rec in (out / "runs").iterdir():
        assert json.loads(rec.read_text())["final_split"] == "VAL_SET"


@pytest.mark.parametrize("text, message", [
    ("bits: 3\nseeds: [0]\ncandidates:\n  - {name: a, qgiat: {}}\n", "candidates[0].qgiat: unknown key"),
    ("bits: 3\nseeds: [0]\nbase: {qgiat: {alpha: 2.0}}\ncandidates:\n  - {name: a}\n",
     "base: expected a mapping of qgait/qat/kd/ptq sections"),
])
def test_tune_grid_errors(tmp_path, capsys, text, message):
    grid = tmp_path / "g.yaml"
    grid.write_text(text)
    assert main(["bench", "tune", "--grid", str(grid), "--quick", "--out", str(tmp_path / "o"),
                 "--cache", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err


def test_diagnose_on_the_quick_benchmark(bench):
    out, _ = bench
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["diagnose", "--bench-dir", str(out), "--bits", "2", "--sequences", "8", "--frames", "3"]) == 0
    # its activation hooks are not the model's ops: no placed site may turn float because of them
    assert not [str(w.message) for w in caught if "dataflow changed" in str(w.message)]
    res = json.loads((out / "diagnose" / "diagnose_w2.json").read_text())
    assert set(res["sensitivity"]) == {"fp", "lsq", "two_phase", "qgait"}
    for table in res["sensitivity"].values():
        for layers in table.values():
            assert all(v >= 0 for v in layers.values())
    assert (out / "diagnose" / "diagnose_w2.png").stat().st_size > 0



def test_diagnose_refuses_a_folder_a_later_benchmark_partly_overwrote(bench, capsys):
    """Issue 18: a second benchmark into the same --out (another --data-seed), interrupted, replaced some
    records and checkpoints; diagnose must not pair this run's FP reference with that run's models."""
    from pathlib import Path

    from qgait_plugin.records import read_record, write_record

    out, _ = bench
    args = ["diagnose", "--bench-dir", str(out), "--bits", "2", "--sequences", "8", "--frames", "3"]
    rec_file = out / "runs" / "lsq-w2a2-s0.json"
    original = rec_file.read_bytes()
    rec = read_record(rec_file)
    ckpt = Path(rec["checkpoint"])
    ckpt_bytes = ckpt.read_bytes()
    try:
        # the later run finished this record...
        write_record(rec_file, {**rec, "provenance": {**rec["provenance"], "data_seed": 1}})
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"qgait diagnose: {rec_file}: made by another benchmark") and "mixes two runs" in err
        rec_file.write_bytes(original)
        # ...or replaced its checkpoint and was stopped before it wrote the record
        other = read_record(out / "runs" / "qgait-w2a2-s0.json")["checkpoint"]
        ckpt.write_bytes(Path(other).read_bytes())
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"qgait diagnose: {ckpt}: checkpoint of lsq-w2a2-s0 is not the one {rec_file}")
    finally:
        rec_file.write_bytes(original)
        ckpt.write_bytes(ckpt_bytes)
    from qgait_plugin.bench.accuracy_report import check_records_agree

    records = [read_record(p) for p in sorted((out / "runs").iterdir())]
    assert check_records_agree(records)["data_seed"] == 0  # the intact folder agrees with itself
