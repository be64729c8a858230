"""Run and time an exported ONNX model on the CPU: onnxruntime (default) or OpenVINO (optional).

One place for what ``qgait export`` (checking its file against PyTorch), ``qgait bench export``
and the demo's deployment step do: open a session with a given number of threads, run it on numpy
inputs fed in the graph's input order, time repeated runs after untimed warm-up runs, read
onnxruntime's optimized graph, and say which CPU instructions and runtime versions the figures
were taken with. onnxruntime is the ``export`` extra; OpenVINO the ``openvino`` extra, imported
only when asked for.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import QGaitError

#: runtimes by the name the commands take (``--runtime``)
RUNTIMES = ("ort", "openvino")
#: /proc/cpuinfo flag -> the name reports print
CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX-512 BF16", "amx_int8": "AMX-INT8"}


class RuntimeMissing(QGaitError):
    """The runtime a command was asked to use is not installed."""


def _ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - the dev and export extras install it
        raise RuntimeMissing("running ONNX models needs the export extra: pip install -e '.[export]'") from e
    return ort


def _openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as e:
        raise RuntimeMissing("--runtime openvino needs the openvino extra: pip install -e '.[openvino]'") from e
    return ov


def openvino_available() -> bool:
    try:
        _openvino()
    except RuntimeMissing:
        return False
    return True


def cpu_session(path: str, threads: int, optimized_model: Optional[str] = None) -> Any:
    """An onnxruntime ``InferenceSession`` for ``path`` on the CPU with ``threads`` intra-op threads.

    Every graph optimization is on (``ORT_ENABLE_ALL``); ``optimized_model`` writes the graph
    onnxruntime actually runs to that file.
    """
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_model:
        opts.optimized_model_filepath = optimized_model
        # onnxruntime warns that a graph optimized this far is for this machine only: we only read it
        opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_session(sess: Any, *inputs: np.ndarray) -> List[np.ndarray]:
    """The session's outputs for ``inputs``, given in the order of the graph's inputs."""
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the model takes {len(names)} inputs {names}, got {len(inputs)}")
    return sess.run(None, dict(zip(names, inputs)))


def optimized_graph(path: str, threads: int = 1) -> Any:
    """The graph (``onnx.GraphProto``) onnxruntime runs for ``path`` (``ORT_ENABLE_ALL``)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        cpu_session(path, threads, optimized_model=out)
        return onnx.load(out).graph


def optimized_graph_ops(path: str, threads: int = 1) -> Dict[str, int]:
    """Op counts of the graph onnxruntime runs for ``path`` (``ORT_ENABLE_ALL``): fused integer ops
    show up as ``QLinearConv``, ``com.microsoft:QLinearAdd``, ``com.microsoft:MatMulIntegerToFloat``."""
    from .passes import op_counts

    return op_counts(optimized_graph(path, threads).node)


class Runner:
    """A compiled model in one runtime: ``run(*inputs)`` returns the outputs as numpy arrays."""

    def __init__(self, runtime: str, run: Callable[..., List[np.ndarray]]) -> None:
        self.runtime = runtime
        self._run = run

    def run(self, *inputs: np.ndarray) -> List[np.ndarray]:
        return self._run(*inputs)


def openvino_default_precision() -> str:
    """The precision OpenVINO's CPU plugin computes a float model in when nobody asks for one
    (``bf16`` on CPUs with AVX-512 BF16 or AMX, else ``f32``): what a user who does not quantize gets."""
    ov = _openvino()
    hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    name = str(getattr(hint, "get_type_name", lambda: hint)())
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(name, name)


def open_runtime(runtime: str, path: str, threads: int, fp32: bool = False,
                 static_shapes: Optional[Sequence[Sequence[int]]] = None) -> Runner:
    """``path`` compiled for ``runtime`` (``"ort"`` or ``"openvino"``) on the CPU with ``threads`` threads.

    ``fp32``: the model stands for FP32, so OpenVINO must compute in f32 (it defaults to bf16 on
    CPUs with AVX-512 BF16/AMX). An int8 QDQ model is read by OpenVINO as it is (its FakeQuantize
    ops run in int8). ``static_shapes`` fixes the inputs' shapes for OpenVINO (faster kernels).
    """
    if runtime == "ort":
        sess = cpu_session(path, threads)
        return Runner("ort", lambda *x: run_session(sess, *x))
    if runtime != "openvino":
        raise QGaitError(f"--runtime: {runtime!r} is not a runtime; choose one of {list(RUNTIMES)}")
    ov = _openvino()
    core = ov.Core()
    model = core.read_model(path)
    if static_shapes is not None:
        model.reshape({model.inputs[i].get_any_name(): list(s) for i, s in enumerate(static_shapes)})
    cfg: Dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if fp32:
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(model, "CPU", cfg)
    request = compiled.create_infer_request()

    def run(*inputs: np.ndarray) -> List[np.ndarray]:
        res = request.infer(list(inputs))
        return [np.asarray(res[o]) for o in compiled.outputs]

    return Runner("openvino", run)


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


def time_interleaved(fns: Dict[str, Callable[[], Any]], runs: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds of ``runs`` calls of each function, one call of each per round, after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def time_session(sess: Any, *inputs: np.ndarray, runs: int, warmup: int = 3) -> List[float]:
    """Seconds of each of ``runs`` session runs on ``inputs``, after ``warmup`` untimed runs."""
    return time_calls(lambda: run_session(sess, *inputs), runs, warmup)


def latency_stats(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, min and max of timed runs, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "runs": int(ms.size)}


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> Dict[str, Any]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (from ``/proc/cpuinfo``)."""
    flags: set = set()
    name = platform.processor() or platform.machine()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = set(val.split())
                elif key == "model name":
                    name = val.strip()
    except OSError:
        pass
    have = {label: flag in flags for flag, label in CPU_FLAGS.items()}
    return {"model": name, "cores": os.cpu_count(), "flags": have}


def cpu_flags_line(info: Optional[Dict[str, Any]] = None) -> str:
    """``CPU: <model>, <n> cores; AVX2 yes, AVX-512F yes, ...``."""
    info = info or cpu_info()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["flags"].items())
    return f"CPU: {info['model']}, {info['cores']} cores; {flags}"


def runtime_versions() -> Dict[str, Optional[str]]:
    """Versions of the runtimes and exporter (``None`` for one that is not installed)."""
    out: Dict[str, Optional[str]] = {}
    for name in ("onnxruntime", "openvino", "onnx", "torch"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            out[name] = None
    return out
