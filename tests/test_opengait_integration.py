"""End-to-end runs of the launcher against a real OpenGait checkout (skipped without OPENGAIT_ROOT).

One module-scoped workspace: a tiny CASIA-B-format data set, an FP run (plugin registered, no
``quant:``), the same run with OpenGait untouched, a W4A4 QAT run across the phase switch, its
resume from an integer ``restore_hint``, the test phase, and a two-process gloo run.
Each run is a subprocess, as a user would start it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.environ.get("OPENGAIT_ROOT")
pytestmark = [pytest.mark.opengait, pytest.mark.slow,
              pytest.mark.skipif(not ROOT, reason="needs an OpenGait checkout in OPENGAIT_ROOT")]
REPO = Path(__file__).resolve().parents[1]


def _launch(args, cwd: Path, torchrun: int = 0, launcher: str = "torch.distributed.run") -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "qgait_plugin", "opengait"] + [str(a) for a in args] + \
        ["--root", ROOT, "--device", "cpu", "--workdir", str(cwd)]
    if torchrun and launcher == "env":  # the processes a launcher starts, started here with its variables
        from qgait_plugin.opengait.runtime import free_port

        port = str(free_port())
        procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(torchrun),
                                           LOCAL_WORLD_SIZE=str(torchrun), MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=port)) for r in range(torchrun)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        out = "".join(outs)
        assert all(p.returncode == 0 for p in procs), out[-4000:]
        return out
    if torchrun:
        from qgait_plugin.opengait.runtime import free_port

        # torchrun, or OpenGait's documented `python -m torch.distributed.launch` (it passes --local_rank
        # on torch 1.x and --local-rank on torch 2, which the CLI accepts as OpenGait's main.py does)
        cmd = [sys.executable, "-m", launcher, f"--nproc_per_node={torchrun}",
               f"--master_port={free_port()}"] + cmd[1:]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _launcher_problem(launcher: str, tmp: Path):
    """Why ``python -m launcher`` cannot start even a one-line script here, or None. Debian 12's
    torch 1.13 runs on Python 3.11, where its elastic agent's ``Std.from_str`` returns None (3.11
    no longer iterates a Flag's zero member) and every launch fails before any script starts."""
    if launcher == "env":
        return None
    script = tmp / "hello.py"
    script.write_text("print('ok')\n")
    from qgait_plugin.opengait.runtime import free_port

    proc = subprocess.run([sys.executable, "-m", launcher, "--nproc_per_node=1", f"--master_port={free_port()}",
                           str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def _iter_lines(log: str):
    return re.findall(r"Iteration (\d+), Cost [\d.]+s, (.*)", log)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import yaml

    from qgait_plugin.opengait.fixtures import tiny_baseline_config, write_tiny_dataset

    d = tmp_path_factory.mktemp("og")
    part = write_tiny_dataset(d)
    fp_cfg = tiny_baseline_config(d, part, "fp", total_iter=2, save_iter=2)
    (d / "fp.yaml").write_text(yaml.safe_dump(fp_cfg))
    fp_ckpt = d / "output/CASIA-B/Baseline/fp/checkpoints/fp-00002.pt"
    quant = {"weight": {"bits": 4}, "act": {"bits": 4}, "init_from": str(fp_ckpt),
             "schedule": {"ste_iters": 2, "soft_iters": 2, "lr_scale": 0.1}, "idd": {"enabled": True}}
    for name, kw in {"qat_a": dict(total_iter=3, save_iter=1),
                     "qat_b": dict(total_iter=4, save_iter=1, restore_hint=3, test_restore_hint=4),
                     "ddp": dict(total_iter=3, save_iter=3)}.items():
        cfg = tiny_baseline_config(d, part, "ddp" if name == "ddp" else "qat", quant=quant, **kw)
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return {"dir": d, "fp_ckpt": fp_ckpt}


@pytest.fixture(scope="module")
def fp_run(ws):
    return _launch(["train", "--cfgs", ws["dir"] / "fp.yaml"], ws["dir"])


def test_plain_config_trains_exactly_as_plain_opengait(ws, fp_run):
    import torch

    assert "qgait:" not in fp_run and "idd_" not in fp_run
    other = ws["dir"] / "plain"
    other.mkdir()
    plain = _launch(["train", "--cfgs", ws["dir"] / "fp.yaml", "--no-plugin"], other)
    ours, theirs = _iter_lines(fp_run), _iter_lines(plain)
    assert len(ours) == 2 and [line for _, line in ours] == [line for _, line in theirs]
    a = torch.load(ws["fp_ckpt"], map_location="cpu", weights_only=False)["model"]
    b = torch.load(other / "output/CASIA-B/Baseline/fp/checkpoints/fp-00002.pt", map_location="cpu",
                   weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def qat_runs(ws, fp_run):
    a = _launch(["train", "--cfgs", ws["dir"] / "qat_a.yaml"], ws["dir"])
    b = _launch(["train", "--cfgs", ws["dir"] / "qat_b.yaml"], ws["dir"])
    return a, b


def test_qat_trains_across_the_switch_with_idd(ws, qat_runs):
    a, _ = qat_runs
    lines = _iter_lines(a)
    assert [int(i) for i, _ in lines] == [1, 2, 3]
    assert all("idd_loss=" in line for _, line in lines)
    assert "phase 'ste'" in a and re.search(r"iteration 2: phase 'ste' -> 'soft'", a)
    ckpts = sorted(p.name for p in (ws["dir"] / "output/CASIA-B/Baseline/qat/checkpoints").iterdir())
    assert ckpts[:3] == ["qat-00001.pt", "qat-00002.pt", "qat-00003.pt"]


def test_checkpoint_holds_quantizers_and_schedule(ws, qat_runs):
    import torch

    sd = torch.load(ws["dir"] / "output/CASIA-B/Baseline/qat/checkpoints/qat-00003.pt", map_location="cpu",
                    weights_only=False)
    model = sd["model"]
    assert any(k.endswith("act_quant.scaled_log_step") for k in model)
    assert any(k.endswith("weight_quant.scaled_log_step") for k in model)
    state = model["qgait_state._extra_state"]
    assert state["schedule"]["phase"] == "soft" and state["schedule"]["lr_scaled"] is True
    # the lr was scaled once at the switch (0.01 -> 0.001) and saved with the optimizer
    assert sd["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)


def test_resume_from_integer_restore_hint_is_in_soft_phase(qat_runs):
    _, b = qat_runs
    assert "Restore Parameters from output/CASIA-B/Baseline/qat/checkpoints/qat-00003.pt" in b
    assert "qgait: iteration 3, phase 'soft'" in b
    lines = _iter_lines(b)
    assert [int(i) for i, _ in lines] == [4] and "idd_loss=" in lines[0][1]


def test_test_phase_loads_strictly_and_prints_rank1(ws, qat_runs):
    import json

    out = _launch(["test", "--cfgs", ws["dir"] / "qat_b.yaml"], ws["dir"])
    assert "Restore Parameters from output/CASIA-B/Baseline/qat/checkpoints/qat-00004.pt" in out
    assert "Rank-1 (Exclude identical-view cases)" in out and re.search(r"NM@R1: [\d.]+%", out)
    rec = json.loads((ws["dir"] / "output/CASIA-B/Baseline/qat/qgait_results.json").read_text())
    assert rec["bits"] == {"weight": 4, "act": 4} and set(rec["metrics"]) >= {"NM@R1", "BG@R1", "CL@R1"}
    assert 0 < rec["size_bytes"]


def test_test_phase_refuses_fp_checkpoint_for_quant_config(ws, fp_run):
    """Strict load: a quant config cannot silently evaluate an FP checkpoint (quantizer keys missing)."""
    import yaml

    cfg = yaml.safe_load((ws["dir"] / "qat_b.yaml").read_text())
    cfg["evaluator_cfg"]["restore_hint"] = str(ws["fp_ckpt"])
    (ws["dir"] / "bad.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "qgait_plugin", "opengait", "test", "--cfgs",
                           str(ws["dir"] / "bad.yaml"), "--root", ROOT, "--device", "cpu", "--workdir", str(ws["dir"])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Missing key(s)" in proc.stderr + proc.stdout


@pytest.mark.parametrize("launcher", ["torch.distributed.run", "torch.distributed.launch", "env"])
def test_two_process_gloo_run_keeps_quantizer_steps_equal(ws, fp_run, launcher, tmp_path):
    import torch

    problem = _launcher_problem(launcher, tmp_path)
    if problem:
        pytest.skip(f"python -m {launcher} fails on a one-line script with this torch {torch.__version__} and "
                    f"Python {sys.version.split()[0]}: {problem}")

    dump = ws["dir"] / "steps-{rank}.pt"
    out = _launch(["train", "--cfgs", ws["dir"] / "ddp.yaml", "--dump-quantizers", dump, "--overwrite"], ws["dir"],
                  torchrun=2, launcher=launcher)
    r0 = torch.load(str(dump).replace("{rank}", "0"), weights_only=False)
    r1 = torch.load(str(dump).replace("{rank}", "1"), weights_only=False)
    assert r0["iteration"] == r1["iteration"] == 3, out[-2000:]
    assert r0["steps"].keys() == r1["steps"].keys() and len(r0["steps"]) > 10
    assert all(torch.equal(r0["steps"][k], r1["steps"][k]) for k in r0["steps"])
    # the steps moved from their initial values (they were trained, not just equal by construction)
    assert any(not torch.equal(r0["steps"][k], torch.ones_like(r0["steps"][k])) for k in r0["steps"])
