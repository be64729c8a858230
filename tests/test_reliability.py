"""Interrupted, concurrent and corrupted: nothing wrong accepted, nothing finished lost (issue 18).

Each test is one case of the issue's second probe (or a variation of it): a damaged file refused
naming the file and the damaged part; an output kept unless ``--force``; a full disk or an unwritable
folder reported as one line with the earlier files intact; one writer per output folder, a killed
writer's lock recovered; Ctrl-C and SIGTERM stopping ``bench accuracy``'s worker pool within seconds
with every finished record kept and resumed; inputs of ``compare``, ``diagnose`` and the Python API
checked. Damaged checkpoints and exports are tested in ``test_local_export.py`` (on its trained QAT
checkpoint), the mixed benchmark folder in ``test_bench_accuracy.py`` (on its finished benchmark).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import test_hostile_input as hostile
import torch
from test_hostile_input import _config, _one_line

from qgait_plugin.cli import main
from qgait_plugin.errors import ConfigError, DamagedFile, OutputBusy, OutputError

REPO = Path(__file__).resolve().parents[1]
#: the module-scoped fixture of tiny data (4 subjects) the hostile-input tests train on
data = hostile.data


#: a subprocess's first lines: the package without its ``__init__`` (which imports torch, seconds on a busy
#: machine), so that the lock, records and worker-pool modules, which need no torch, start in milliseconds
_LIGHT = textwrap.dedent(f"""
    import sys, types
    _pkg = types.ModuleType("qgait_plugin")
    _pkg.__path__ = [{str(REPO / 'qgait_plugin')!r}]
    sys.modules.setdefault("qgait_plugin", _pkg)
""")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A separate process that takes ``folder``'s lock as :mod:`qgait_plugin.lock` does (``flock`` on
    ``.qgait-lock``, pid inside), says so, and holds it until killed. Written out here so that it starts
    in milliseconds, without importing torch."""
    folder.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(folder / '.qgait-lock')!r}, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        print("held", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def _run_dir(tmp_path: Path, save_name: str = "run") -> Path:
    return tmp_path / "out" / "SynthGait" / "GaitBaseLite" / save_name


# ------------------------------------------------------------------------------------------------
# one writer per output folder


def test_lock_refuses_a_second_writer_naming_its_pid(tmp_path):
    from qgait_plugin.lock import output_lock

    holder = _hold_lock(tmp_path / "out")
    try:
        with pytest.raises(OutputBusy, match=f"process {holder.pid} is writing into it"):
            with output_lock(str(tmp_path / "out"), "--out"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the killed holder's lock: the next writer takes it over, and leaves no lock behind
    with output_lock(str(tmp_path / "out"), "--out"):
        assert (tmp_path / "out" / ".qgait-lock").read_text().strip() == str(os.getpid())
    assert os.listdir(tmp_path / "out") == []  # the lock file goes with its holder
    from qgait_plugin.lock import output_lock as lock

    with lock(str(tmp_path / "fresh")):
        pass
    assert not (tmp_path / "fresh").exists()  # made for the lock, still empty: removed again


def test_lock_file_of_a_dead_pid_is_recovered(tmp_path):
    from qgait_plugin.lock import output_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".qgait-lock").write_text(dead.stdout)
    with output_lock(str(tmp_path)):
        with output_lock(str(tmp_path)):  # re-entrant within one process
            pass
        assert (tmp_path / ".qgait-lock").read_text().strip() == str(os.getpid())


def test_many_writers_at_once_exactly_one_holds_the_lock(tmp_path):
    go = tmp_path / "go"
    code = _LIGHT + textwrap.dedent(f"""
        import os, time, sys
        from qgait_plugin.errors import OutputBusy
        from qgait_plugin.lock import output_lock
        print("ready", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        try:
            with output_lock({str(tmp_path / 'out')!r}):
                time.sleep(2.0)
        except OutputBusy as e:
            print("busy", e); sys.exit(3)
        print("held")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
             for _ in range(3)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.write_text("")
    outs = [(p.communicate(timeout=60)[0], p.returncode) for p in procs]
    assert sorted(rc for _, rc in outs) == [0, 3, 3], outs
    pids = {str(p.pid) for p in procs}
    for text, rc in outs:
        if rc == 3:
            assert any(f"process {pid} " in text for pid in pids)


def test_training_into_a_save_name_another_run_writes_is_refused_at_once(tmp_path, data, capsys):
    cfg = _config(tmp_path / "c.yaml", data)
    holder = _hold_lock(_run_dir(tmp_path))
    try:
        t0 = time.time()
        assert main(["train", "--cfgs", cfg, "--no-progress"]) == 2
        assert time.time() - t0 < 30
    finally:
        holder.kill()
        holder.wait()
    err = _one_line(capsys, "train")
    assert f"trainer_cfg.save_name {_run_dir(tmp_path)}: process {holder.pid} is writing into it now" in err
    assert not (_run_dir(tmp_path) / "checkpoints").exists()


def test_bench_and_demo_folders_are_locked(tmp_path, capsys):
    holder = _hold_lock(tmp_path / "bench")
    try:
        assert main(["bench", "accuracy", "--quick", "--out", str(tmp_path / "bench"), "--cache",
                     str(tmp_path / "cache"), "--no-progress"]) == 2
        assert f"--out {tmp_path / 'bench'}: process {holder.pid}" in _one_line(capsys, "bench")
    finally:
        holder.kill()
        holder.wait()
    holder = _hold_lock(tmp_path / "demo")
    try:
        assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
        assert f"--out {tmp_path / 'demo'}: process {holder.pid}" in _one_line(capsys, "demo")
        assert main(["ablate", "--demo-dir", str(tmp_path / "demo"), "--no-progress"]) == 2
        assert f"demo folder {tmp_path / 'demo'}: process {holder.pid}" in _one_line(capsys, "ablate")
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------
# full disks and unwritable outputs: one line, earlier files intact, nothing half-written


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_earlier_one(tmp_path, data, capsys,
                                                                                    monkeypatch):
    import qgait_plugin.checkpoint as ck
    from qgait_plugin.checkpoint import read_checkpoint

    cfg = _config(tmp_path / "c.yaml", data, trainer_cfg={"total_iter": 2, "save_iter": 1})
    real = torch.save
    calls = []

    def save(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half")
            _enospc()
        real(obj, f)

    monkeypatch.setattr(ck.torch, "save", save)
    assert main(["train", "--cfgs", cfg, "--no-progress"]) == 2
    err = _one_line(capsys, "train")
    first = _run_dir(tmp_path) / "checkpoints" / "run-00001.pt"
    assert "cannot write" in err and "run-00002.pt: No space left on device" in err
    assert f"The last good checkpoint is {first}" in err
    assert read_checkpoint(str(first))["iteration"] == 1
    assert sorted(p.name for p in first.parent.iterdir()) == ["run-00001.pt"]  # no temporary file left


def test_full_disk_in_synth_is_one_line_and_leaves_no_half_data_set(tmp_path, capsys, monkeypatch):
    import qgait_plugin.layout as layout

    real, calls = layout._write, []

    def write(path, payload):
        calls.append(path)
        if len(calls) > 3:
            _enospc()
        real(path, payload)

    monkeypatch.setattr(layout, "_write", write)
    out = tmp_path / "set"
    assert main(["synth", "--quick", "--workers", "1", "--out", str(out)]) == 2
    captured = capsys.readouterr()  # the progress bar shares stderr; the error is one line of it
    lines = [line for line in captured.err.splitlines() if "qgait synth: " in line]
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert "No space left on device" in lines[0] and str(out) in lines[0]
    assert not out.exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    from qgait_plugin.atomic import check_writable

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable(str(blocker / "sub" / "x.onnx"), "--out")
    assert main(["synth", "--quick", "--out", str(blocker / "set")]) == 2
    assert "is a file, not a folder" in _one_line(capsys, "synth")
    t0 = time.time()
    assert main(["bench", "accuracy", "--quick", "--out", str(blocker / "b"), "--cache", str(tmp_path / "c")]) == 2
    assert "is a file, not a folder" in _one_line(capsys, "bench") and time.time() - t0 < 10
    assert not (tmp_path / "c").exists()


def test_write_atomic_reports_permission_and_space_as_one_line(tmp_path, monkeypatch):
    from qgait_plugin.atomic import check_writable, write_atomic

    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(OutputError, match=r"keep.txt: No space left on device; free some space"):
        write_atomic(str(tmp_path / "keep.txt"), _enospc)
    assert (tmp_path / "keep.txt").read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(OutputError, match="permission denied"):
        check_writable(str(tmp_path / "new" / "x.json"), "--out")


# ------------------------------------------------------------------------------------------------
# bench export: --force, arguments checked as given


def test_bench_export_keeps_an_earlier_run_without_force(tmp_path, capsys):
    out = tmp_path / "bx"
    (tmp_path / "bx.md").write_text("earlier")
    (tmp_path / "bx.json").write_text("{}")
    t0 = time.time()
    assert main(["bench", "export", "--quick", "--out", str(out)]) == 2
    err = _one_line(capsys, "bench")
    assert "bx.json: exists; pass --force" in err and time.time() - t0 < 10
    assert (tmp_path / "bx.md").read_text() == "earlier"


@pytest.mark.parametrize("args, message", [
    (["--runs", "-3"], "--runs -3"),
    (["--threads", "-3"], "every --threads >= 1"),
    (["--warmup", "-1"], "--warmup -1"),
])
def test_bench_export_quick_does_not_excuse_bad_arguments(tmp_path, capsys, args, message):
    assert main(["bench", "export", "--quick", "--out", str(tmp_path / "bx"), *args]) == 2
    assert message in _one_line(capsys, "bench")


def test_bench_export_refuses_a_keep_folder_it_cannot_write(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["bench", "export", "--quick", "--out", str(tmp_path / "bx"), "--keep", str(tmp_path / "f")]) == 2
    assert "--keep" in _one_line(capsys, "bench")
    assert main(["bench", "export", "--quick", "--out", str(tmp_path / "bx"), "--keep",
                 str(tmp_path / "f" / "sub")]) == 2
    assert "is a file, not a folder" in _one_line(capsys, "bench")


def test_negative_threads_are_refused(tmp_path, capsys):
    assert main(["bench", "overhead", "--threads", "-3"]) == 2
    assert "--threads: -3" in _one_line(capsys, "bench")
    assert main(["demo", "--threads", "-3", "--out", str(tmp_path / "d")]) == 2
    assert "--threads: -3" in _one_line(capsys, "demo")


# ------------------------------------------------------------------------------------------------
# qgait compare: scale, types, shared metrics, what it skipped


def _res(path: Path, metrics, **kw) -> str:
    d = {"format": "qgait-results/1", "model": "Baseline", "dataset": "CASIA-B", "metrics": metrics,
         "size_bytes": 4000, "bits": None}
    d.update(kw)
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("metrics, extra, message", [
    ({"NM@R1": 0.969, "BG@R1": 0.92}, {}, "fraction of 1"),
    ({"NM@R1": True}, {}, "metrics.NM@R1: True (bool); expected a number"),
    ({"NM@R1": "96.6"}, {}, "metrics.NM@R1: '96.6' (str)"),
    ({"NM@R1": [96.6]}, {}, "metrics.NM@R1: [96.6] (list)"),
    ({"NM@R1": 9660}, {}, "outside 0..100"),
    ({"NM@R1": 96.0}, {"size_bytes": "4 MB"}, "size_bytes: '4 MB'"),
    ({"NM@R1": 96.0}, {"bits": {"weight": "4", "act": 4}}, "bits:"),
    ({"Rank-1": 60.0}, {}, "shares no rank-1/mAP metric"),
])
def test_compare_refuses_what_it_cannot_compare(tmp_path, capsys, metrics, extra, message):
    fp = _res(tmp_path / "fp.json", {"NM@R1": 97.6, "BG@R1": 94.0})
    q = _res(tmp_path / "q.json", metrics, **extra)
    assert main(["compare", fp, q]) == 2
    err = _one_line(capsys, "compare")
    assert message in err and ("q.json" in err or "fraction" in err)


def test_compare_refuses_a_list_and_says_what_it_skipped(tmp_path, capsys):
    fp = _res(tmp_path / "fp.json", {"NM@R1": 97.6, "BG@R1": 94.0, "loss": 1.5})
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["compare", fp, str(tmp_path / "list.json")]) == 2
    assert "list.json: holds a JSON list" in _one_line(capsys, "compare")
    q = _res(tmp_path / "q.json", {"NM@R1": 96.6, "CL@R1": 70.0})
    assert main(["compare", fp, q]) == 0
    captured = capsys.readouterr()
    assert "96.60 (-1.00)" in captured.out
    assert "fp.json: skipped ['loss'] (not rank-1 or mAP)" in captured.err
    assert "q.json: ['CL@R1'] have no FP value" in captured.err


# ------------------------------------------------------------------------------------------------
# bench accuracy's worker pool: Ctrl-C and SIGTERM stop it, finished records stay, a rerun resumes

_POOL_SCRIPT = _LIGHT + textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from qgait_plugin.bench.accuracy import run_jobs
    from qgait_plugin.errors import Interrupted

    def job(j):
        Path(j["calls"], f"{j['name']}.{os.getpid()}.{time.time_ns()}").write_text("")
        time.sleep(j["sleep"])
        return {"name": j["name"], "rank1": {"mean": 50.0 + j["host_cfg"]["i"]}}

    if __name__ == "__main__":
        runs, sleeps = Path(sys.argv[1]), json.loads(sys.argv[2])
        calls = runs.parent / "calls"
        calls.mkdir(exist_ok=True)
        jobs = [{"name": f"j{i}", "host_cfg": {"i": i}, "final_split": "TEST_SET", "sleep": s, "calls": str(calls),
                 "provenance": {"data_seed": 0, "code_version": "test"}} for i, s in enumerate(sleeps)]
        try:
            recs = run_jobs(jobs, runs, workers=2, progress=False, fn=job)
        except Interrupted as e:
            print("interrupted:", e, file=sys.stderr)
            sys.exit(130)
        print(json.dumps([r["rank1"]["mean"] for r in recs]))
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_bench_worker_pool_stops_within_seconds_keeps_finished_runs_and_resumes(tmp_path, sig):
    from qgait_plugin.records import read_record

    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    runs = tmp_path / "runs"
    p = subprocess.Popen([sys.executable, str(script), str(runs), json.dumps([0.0, 60, 60, 60, 60])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 60
    while not (runs / "j0.json").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    while len(list((tmp_path / "calls").iterdir())) < 3:  # j0 done, two long jobs running
        assert time.time() < deadline
        time.sleep(0.05)
    t0 = time.time()
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert time.time() - t0 < 10
    assert p.returncode == 130, err
    assert f"stopped by {sig.name}: 1 of 5 runs finished" in err and "Traceback" not in err
    assert read_record(runs / "j0.json")["rank1"]["mean"] == 50.0
    assert sorted(f.name for f in runs.iterdir()) == ["j0.json"]
    workers = {int(f.name.split(".")[1]) for f in (tmp_path / "calls").iterdir()}
    time.sleep(0.5)
    for pid in workers:  # every worker ended with the parent: none went on with the queue
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    if sig != signal.SIGINT:
        return  # the resume is the same after either signal; run it once
    # a record cut short by a kill is not taken for a finished run: it runs again, and the file is named
    (runs / "j1.json").write_text('{"name": "j1", "rank1": {"me')
    done = subprocess.run([sys.executable, str(script), str(runs), json.dumps([0.0] * 5)], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [50.0, 51.0, 52.0, 53.0, 54.0]
    assert f"{runs / 'j1.json'}: run record is damaged or cut short" in done.stderr
    calls = [f.name.split(".")[0] for f in (tmp_path / "calls").iterdir()]
    assert calls.count("j0") == 1  # the finished run was kept, not run again


def test_records_verify_their_digest(tmp_path):
    from qgait_plugin.records import read_record, write_record

    write_record(tmp_path / "r.json", {"rank1": {"mean": 71.06}, "seed": 0})
    assert read_record(tmp_path / "r.json") == {"rank1": {"mean": 71.06}, "seed": 0}
    text = (tmp_path / "r.json").read_text()
    (tmp_path / "r.json").write_text(text.replace("71.06", "71.07"))
    with pytest.raises(DamagedFile, match=r"r.json: record is damaged: its content no longer matches"):
        read_record(tmp_path / "r.json")
    (tmp_path / "r.json").write_text(text[: len(text) // 2])
    with pytest.raises(DamagedFile, match=r"r.json: record is damaged or cut short: not valid JSON"):
        read_record(tmp_path / "r.json")


def test_report_refuses_records_that_disagree():
    from qgait_plugin.bench.accuracy_report import summarize

    def rec(name, seed):
        return {"name": name, "method": "lsq", "bits": 4, "seed": 0, "provenance": {"data_seed": seed}}

    with pytest.raises(DamagedFile, match=r"'a' and 'b' disagree on data_seed \(0 vs 1\)"):
        summarize({}, [rec("a", 0), rec("b", 1)])


# ------------------------------------------------------------------------------------------------
# qgait diagnose: arguments and results files


@pytest.mark.parametrize("args, message", [
    (["--sequences", "0"], "--sequences: 0"),
    (["--frames", "0"], "--frames: 0"),
    (["--methods", "lsq,nope"], "--methods: ['nope']"),
])
def test_diagnose_checks_its_arguments(tmp_path, capsys, args, message):
    assert main(["diagnose", "--bench-dir", str(tmp_path), *args]) == 2
    assert message in _one_line(capsys, "diagnose")


@pytest.mark.parametrize("content, message", [
    ('{"summary": {}, "meta": {"con', "results.json: benchmark results is damaged or cut short"),
    (None, "holds no complete 'meta' section"),
])
def test_diagnose_refuses_a_half_written_or_meta_less_results_file(tmp_path, capsys, content, message):
    from qgait_plugin.records import write_record

    if content is None:
        write_record(tmp_path / "results.json", {"summary": {}, "runs": []})
    else:
        (tmp_path / "results.json").write_text(content)
    assert main(["diagnose", "--bench-dir", str(tmp_path)]) == 2
    assert message in _one_line(capsys, "diagnose")


# ------------------------------------------------------------------------------------------------
# the Python API and synth's arguments


def test_soft_rounding_at_alpha_zero_is_ste_and_negative_alpha_is_refused():
    from qgait_plugin.quant.quantizer import fake_quantize
    from qgait_plugin.quant.rounding import soft_round, soft_round_grad, soft_round_value

    x = torch.linspace(-3, 3, 101, dtype=torch.float64, requires_grad=True)
    step = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    grads = {}
    for mode, alpha in (("ste", 3.0), ("soft", 0.0), ("soft", 1e-300)):
        x.grad = step.grad = None
        fake_quantize(x, step, -7, 7, rounding=mode, alpha=alpha).sum().backward()
        grads[(mode, alpha)] = (x.grad.clone(), step.grad.clone())
    for key in (("soft", 0.0), ("soft", 1e-300)):
        torch.testing.assert_close(grads[key], grads[("ste", 3.0)])
    v = torch.linspace(-2, 2, 9)
    assert torch.equal(soft_round_grad(v, 0.0), torch.ones_like(v)) and torch.equal(soft_round_value(v, 0.0), v)
    y = v.clone().requires_grad_()
    soft_round(y, 0.0).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(v))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="soft rounding alpha"):
            soft_round_grad(v, bad)
        with pytest.raises(ConfigError, match="soft rounding alpha"):
            soft_round(v, bad)


def test_quantize_model_twice_says_already_quantized():
    from qgait_plugin.quant.convert import quantize_model

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    quantize_model(model, {"weight": {"bits": 4}, "act": {"bits": 4}})
    with pytest.raises(ConfigError, match=r"Sequential is already quantized \(\d+ quantizers\)"):
        quantize_model(model, {"weight": {"bits": 4}, "act": {"bits": 4}})


def test_synth_views_off_the_18_degree_grid_are_refused(tmp_path, capsys):
    assert main(["synth", "--quick", "--out", str(tmp_path / "s"), "--views", "0,45"]) == 2
    assert "view 45 is not on CASIA-B's 18-degree grid" in _one_line(capsys, "synth")
    assert not (tmp_path / "s").exists()
