"""``qgait compare`` on fixture results (no OpenGait needed)."""
from __future__ import annotations

import json

import pytest

from qgait_plugin.opengait.compare import CompareError, compare_files, parse_log


def _rec(path, metrics, bits=None, size=4000, dataset="CASIA-B", name="run"):
    path.write_text(json.dumps({"format": "qgait-results/1", "model": "Baseline", "dataset": dataset,
                                "save_name": name, "metrics": metrics, "size_bytes": size, "bits": bits}))
    return str(path)


def test_table_has_deltas_size_and_bits(tmp_path):
    fp = _rec(tmp_path / "fp.json", {"NM@R1": 97.6, "BG@R1": 94.0, "CL@R1": 77.4}, size=32000)
    q4 = _rec(tmp_path / "w4.json", {"NM@R1": 96.1, "BG@R1": 92.5, "CL@R1": 74.0}, bits={"weight": 4, "act": 4})
    table = compare_files(fp, [q4])
    rows = table.splitlines()
    assert rows[0].startswith("| run |") and "NM R1" in rows[0] and len(rows) == 4
    assert "W4A4" in rows[3] and "96.10 (-1.50)" in rows[3] and "74.00 (-3.40)" in rows[3]
    assert "8.0x smaller" in rows[3] and "FP32" in rows[2]


def test_reads_opengait_logs_rank1_and_map(tmp_path):
    casia = "[t] [INFO]: NM@R1: [97.0 98.0]\n[t] [INFO]: NM@R1: 97.50%\tBG@R1: 93.10%\tCL@R1: 80.00%\t\n"
    assert parse_log(casia) == {"NM@R1": 97.5, "BG@R1": 93.1, "CL@R1": 80.0}
    gait3d = "[t] [INFO]: {'scalar/test_accuracy/Rank-1': np.float64(64.6), 'scalar/test_accuracy/mAP': 55.2}\n"
    assert parse_log(gait3d) == {"Rank-1": 64.6, "mAP": 55.2}
    grew = "[t] [INFO]: ==Rank-1==\n[t] [INFO]: 60.100\n[t] [INFO]: ==Rank-5==\n[t] [INFO]: 75.000\n"
    assert parse_log(grew) == {"Rank-1": 60.1}
    (tmp_path / "fp.txt").write_text(gait3d)
    q = _rec(tmp_path / "q.json", {"Rank-1": 60.0, "mAP": 50.0}, bits={"weight": 8, "act": 8}, dataset="Gait3D")
    table = compare_files(str(tmp_path / "fp.txt"), [q])
    assert "60.00 (-4.60)" in table and "50.00 (-5.20)" in table


def test_errors(tmp_path):
    with pytest.raises(CompareError, match="no such file"):
        compare_files(str(tmp_path / "nope.json"), [])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CompareError, match="qgait-results/1"):
        compare_files(str(tmp_path / "bad.json"), [])
    fp = _rec(tmp_path / "a.json", {"NM@R1": 1.0})
    other = _rec(tmp_path / "b.json", {"NM@R1": 1.0}, dataset="OUMVLP")
    with pytest.raises(CompareError, match="another data set"):
        compare_files(fp, [other])
