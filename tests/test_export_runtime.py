"""Running and timing an exported model: one onnxruntime session helper for ``qgait export`` and the benchmark."""
from __future__ import annotations

import pytest
import torch
from conftest import w8_cosine_floor

from qgait_plugin.compat import onnx_export_kwargs
from qgait_plugin.export.runtime import time_calls


def test_time_calls_counts_warmup_and_runs():
    calls = []
    times = time_calls(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)


def test_session_runs_and_times_a_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from qgait_plugin.export.runtime import cpu_session, run_session, time_session

    model = torch.nn.Linear(3, 2).eval()
    x = torch.rand(4, 3)
    path = str(tmp_path / "lin.onnx")
    torch.onnx.export(model, (x,), path, **onnx_export_kwargs(), input_names=["x"], output_names=["y"])
    sess = cpu_session(path, threads=1)
    (y,) = run_session(sess, x.numpy())
    assert torch.allclose(torch.from_numpy(y), model(x).detach(), atol=1e-6)
    assert len(time_session(sess, x.numpy(), runs=3, warmup=1)) == 3
    with pytest.raises(ValueError, match="takes 1 inputs"):
        run_session(sess, x.numpy(), x.numpy())


def test_cpu_info_reads_the_flags(tmp_path):
    from qgait_plugin.export.runtime import cpu_flags_line, cpu_info

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n\n"
                 "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu avx2\n")
    info = cpu_info(str(f))
    assert info["model"] == "Some CPU"
    assert info["flags"] == {"AVX2": True, "AVX-512F": True, "AVX-512 VNNI": True, "AVX-VNNI": False,
                             "AVX-512 BF16": False, "AMX-INT8": True}
    assert "AMX-INT8 yes" in cpu_flags_line(info) and "AVX-VNNI no" in cpu_flags_line(info)


def test_openvino_runs_the_same_model(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    from qgait_plugin.export.runtime import open_runtime

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    x = torch.rand(2, 1, 8, 8)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (x,), path, **onnx_export_kwargs(), input_names=["x"])
    ref = model(x).detach().numpy()
    for fp32 in (True, False):
        out = open_runtime("openvino", path, 1, fp32=fp32, static_shapes=[x.shape]).run(x.numpy())[0]
        assert abs(out - ref).max() < (1e-5 if fp32 else 5e-2)  # without the hint it may compute in bf16


def test_bench_export_quick_writes_table_and_json(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import json

    from qgait_plugin.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "export", "--quick", "--runtimes", "ort", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    net = res["networks"]["quick"]
    assert set(net["latency"]["ort/1"]) == {"fp32", "w8a8", "w4a4"}
    assert net["latency"]["ort/1"]["w8a8"]["runs"] == 3
    assert set(net["bytes"]) == {"fp32", "w8a8", "w4a4", "packed_w4a4"}
    assert min(net["cosine_vs_torch"].values()) >= w8_cosine_floor(8)
    assert net["optimized_ops"]["w8a8"].get("com.microsoft:QLinearAdd", 0) >= 1
    assert "AVX2" in res["cpu"]["flags"]  # the flags read from /proc/cpuinfo (which differ between machines)
    text = capsys.readouterr().out
    assert "CPU:" in text and "| onnxruntime | 1 | W8A8 |" in text and (tmp_path / "bench.md").is_file()
