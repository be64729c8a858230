"""The PTQ benchmark's plan: its config, the float32-sum switch of its evaluation, and its run order."""
from pathlib import Path

import pytest
import yaml

from qgait_plugin.bench.accuracy import job_digest, load_bench_config, plan_jobs, ptq_job_cost
from qgait_plugin.bench.methods import METHODS
from qgait_plugin.errors import ConfigError

PTQ_YAML = Path(__file__).resolve().parents[1] / "configs" / "bench" / "ptq.yaml"


def _jobs(cfg, tmp_path):
    return plan_jobs(cfg, tmp_path / "data", tmp_path / "out", str(tmp_path / "fp.pt"), "TEST_SET")


def test_ptq_benchmark_plans_lsq_its_control_and_every_ptq_method_longest_first(tmp_path):
    cfg = load_bench_config(PTQ_YAML)
    jobs = _jobs(cfg, tmp_path)
    methods = {j["method"] for j in jobs}
    assert methods == {"fp_continued", "lsq", "fp", "ptq", "ptq_idc", "ptq_kd", "ptq_task", "ptq_recon"}
    assert len([j for j in jobs if j["method"] == "lsq"]) == 9 and len([j for j in jobs if j["method"] == "fp"]) == 1
    assert len([j for j in jobs if j["method"] == "fp_continued"]) == 3  # one per seed, FP
    assert all(j["eval_float64"] is False for j in jobs)
    ptq = sorted((j for j in jobs if j["method"] not in METHODS), key=ptq_job_cost, reverse=True)
    costs = [ptq_job_cost(j) for j in ptq]
    first_plain = next(i for i, j in enumerate(ptq) if j["method"] in ("ptq", "fp"))
    assert all(c > 0 for c in costs[:first_plain]) and all(c == 0 for c in costs[first_plain:])
    assert len(ptq) == 1 + 5 * 3 * 3


def test_eval_float64_is_checked_and_part_of_a_records_digest(tmp_path):
    raw = yaml.safe_load(PTQ_YAML.read_text())
    raw["fp"]["host"] = str(PTQ_YAML.parent / "fp.yaml")
    raw["qat"]["eval_float64"] = True
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump(raw))
    exact = _jobs(load_bench_config(p), tmp_path)
    fast = _jobs(load_bench_config(PTQ_YAML), tmp_path)
    # the same runs, but a record evaluated with float32 sums never stands for one evaluated exactly
    assert [j["host_cfg"] for j in exact] == [j["host_cfg"] for j in fast]
    assert all(job_digest(a) != job_digest(b) for a, b in zip(exact, fast))
    raw["qat"]["eval_float64"] = "yes"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="qat.eval_float64"):
        load_bench_config(p)
