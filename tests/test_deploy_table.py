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


def test_bench_export_table_shows_openvinos_default_precision_beside_f32():
    from qgait_plugin.bench.export_speed import FP_DEFAULT, format_tables

    st = {"median_ms": 10.0, "q1_ms": 9.0, "q3_ms": 11.0, "min_ms": 8.0, "max_ms": 12.0}
    net = {"input": [1, 4, 16, 11], "spec": {"channels": [8, 16]}, "openvino_default_precision": "bf16",
           "latency": {"openvino/1": {"fp32": st, "w8a8": dict(st, median_ms=4.0),
                                      FP_DEFAULT: dict(st, median_ms=5.0)}},
           "bytes": {"fp32": 4000, "w8a8": 1000, "w4a4": 1000, "packed_w4a4": 500},
           "cosine_vs_torch": {"w8a8": 1.0}}
    res = {"cpu": {"flags": {}, "model": "x", "cores": 2}, "versions": {"onnxruntime": "1", "openvino": "2026"},
           "runs": 3, "warmup": 1, "load_average": [1.0], "networks": {"n": net}}
    md = format_tables(res)
    assert "| OpenVINO | 1 | FP32 (f32 hint) | 10.0 |" in md
    assert "| OpenVINO | 1 | FP, OpenVINO default (bf16) | 5.0 |" in md and "| 2.00 |" in md
