"""Running and timing an exported model: one onnxruntime session helper for ``qgait export`` and the benchmark."""
from __future__ import annotations

import pytest
import torch

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
    torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"])
    sess = cpu_session(path, threads=1)
    (y,) = run_session(sess, x.numpy())
    assert torch.allclose(torch.from_numpy(y), model(x).detach(), atol=1e-6)
    assert len(time_session(sess, x.numpy(), runs=3, warmup=1)) == 3
    with pytest.raises(ValueError, match="takes 1 inputs"):
        run_session(sess, x.numpy(), x.numpy())
