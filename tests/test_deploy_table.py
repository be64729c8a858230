"""The demo's deploy table: each row's int8 and FP32 latency of the same network, the ratio of those
columns, and a note when the networks are too small for the timing to mean much."""
from qgait_plugin.local.deploy import SMALL_NETWORK_MS, format_deploy_table


def _lat(ms):
    return {"median_ms": ms, "runs": 3}


def _report(fp_ms, q_ms, q_fp_ms):
    fp = {"onnx_bytes": 4000, "latency": {"fp32": _lat(fp_ms), "int8": _lat(fp_ms)}, "speedup": 1.0,
          "cosine_min": 1.0, "rank1_torch": {"mean": 80.0}, "rank1_runtime": {"mean": 80.0}}
    q = {"onnx_bytes": 1000, "packed_bytes": 600, "latency": {"fp32": _lat(q_fp_ms), "int8": _lat(q_ms)},
         "speedup": q_fp_ms / q_ms, "cosine_min": 0.99999, "rank1_torch": {"mean": 79.0},
         "rank1_runtime": {"mean": 79.0}}
    return {"fp": fp, "w8a8_lsq": q}


def test_rows_show_both_latencies_and_their_ratio():
    md = format_deploy_table(_report(40.0, 20.0, 50.0), 2)
    row = next(line for line in md.splitlines() if line.startswith("| w8a8_lsq"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:6] == ["20.00", "50.00", "2.50"]  # int8 ms, FP32 ms of the same network, their ratio
    fp_row = next(line for line in md.splitlines() if line.startswith("| fp "))
    assert [c.strip() for c in fp_row.strip("|").split("|")][3:6] == ["-", "40.00", "1.00"]
    assert "too small" not in md


def test_small_networks_are_said_to_be():
    md = format_deploy_table(_report(1.3, 1.3, 1.34), 2)
    assert "too small for the speed ratio to mean much" in md and f"{SMALL_NETWORK_MS:g} ms" in md
