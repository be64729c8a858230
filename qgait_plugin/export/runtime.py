"""Run and time an exported ONNX model in onnxruntime on the CPU.

One place for what ``qgait export`` (checking its file against PyTorch) and ``qgait bench export``
(latency against FP32) both do: open a session with a given number of threads, run it on numpy
inputs fed in the graph's input order, and time repeated runs after a few untimed warm-up runs.
onnxruntime is the ``export`` extra, imported when a session is made.
"""
from __future__ import annotations

import time
from typing import Any, Callable, List

import numpy as np


def cpu_session(path: str, threads: int) -> Any:
    """An onnxruntime ``InferenceSession`` for ``path`` on the CPU with ``threads`` intra-op threads."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - the dev and export extras install it
        raise RuntimeError("running ONNX models needs the export extra: pip install -e '.[export]'") from e

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_session(sess: Any, *inputs: np.ndarray) -> List[np.ndarray]:
    """The session's outputs for ``inputs``, given in the order of the graph's inputs."""
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the model takes {len(names)} inputs {names}, got {len(inputs)}")
    return sess.run(None, dict(zip(names, inputs)))


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 3) -> List[float]:
    """Seconds of each of ``runs`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_session(sess: Any, *inputs: np.ndarray, runs: int, warmup: int = 3) -> List[float]:
    """Seconds of each of ``runs`` session runs on ``inputs``, after ``warmup`` untimed runs."""
    return time_calls(lambda: run_session(sess, *inputs), runs, warmup)
