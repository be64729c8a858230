"""``qgait bench tune``: search QGait's knobs on the validation subjects, never the test ones.

A grid file (``configs/bench/tune.yaml``) names the bit width, the seeds and a list of candidates;
each candidate overrides sections of the benchmark config (``qgait:``, ``qat:``, ``kd:``) and names
the methods it runs (default ``qgait``). Every run is trained exactly as ``qgait bench accuracy``
trains it, from the same cached FP reference, but its final evaluation reads ``VAL_SET``;
``TEST_SET`` is not loaded at all. The log (``tune_log.md`` / ``tune_log.json``) lists every
candidate with its validation rank-1 (mean ± std over seeds) and its paired difference to the
``lsq`` run of the same seeds, and the total wall time spent: the budget, stated.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

from ..errors import ConfigError, short_repr
from .accuracy import (
    default_config_path,
    load_bench_config,
    plan_jobs,
    prepare_data,
    read_yaml,
    run_jobs,
    train_fp_reference,
)
from .accuracy_report import _paired
from .stats import mean_std

GRID_KEYS = ("bits", "seeds", "candidates", "iters", "base")
CANDIDATE_KEYS = ("name", "methods", "qgait", "qat", "kd", "ptq", "note")
#: the benchmark config's sections a grid's base and its candidates may override
SECTIONS = ("qgait", "qat", "kd", "ptq")


def load_grid(path: Path) -> Dict[str, Any]:
    grid = read_yaml(path, "tuning grid")
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {list(GRID_KEYS)}")
    for k in grid:
        if k not in GRID_KEYS:
            raise ConfigError(f"{path}: {k}: unknown key; allowed: {list(GRID_KEYS)}")
    names = set()
    for i, c in enumerate(grid.get("candidates") or []):
        if not isinstance(c, dict) or "name" not in c:
            raise ConfigError(f"{path}: candidates[{i}]: expected a mapping with a name")
        for k in c:
            if k not in CANDIDATE_KEYS:
                raise ConfigError(f"{path}: candidates[{i}].{k}: unknown key; allowed: {list(CANDIDATE_KEYS)}")
        if c["name"] in names:
            raise ConfigError(f"{path}: candidates[{i}].name: {c['name']!r} is used twice")
        names.add(c["name"])
    base = grid.get("base")
    if base is not None and (not isinstance(base, dict) or set(base) - set(SECTIONS)):
        raise ConfigError(f"{path}: base: expected a mapping of {'/'.join(SECTIONS)} sections, got {short_repr(base)}")
    if not names:
        raise ConfigError(f"{path}: candidates: give at least one")
    return grid


def run_tuning(cfg: Dict[str, Any], grid: Mapping[str, Any], out: Path, cache: Path, progress: bool = True,
               workers: int = 2) -> Dict[str, Any]:
    """Run every candidate (and the lsq baseline) at ``grid.bits`` for ``grid.seeds``; VAL_SET only."""
    from ..local.config import merge_dicts

    t0 = time.time()
    base = copy.deepcopy(cfg)
    if grid.get("iters"):
        base["qat"]["iters"] = int(grid["iters"])
    # the grid's own base (the defaults it was searched from), so that its runs stay what they were
    # after the winner becomes the benchmark config's default
    for sec, val in (grid.get("base") or {}).items():
        base[sec] = merge_dicts(base.get(sec) or {}, val)
    data = prepare_data(base, cache, progress)
    fp = train_fp_reference(base, data, cache, progress)
    bits = int(grid["bits"])
    seeds = [int(s) for s in grid["seeds"]]
    jobs: List[Dict[str, Any]] = []
    owners: List[str] = []
    for cand in grid["candidates"]:
        c_cfg = copy.deepcopy(base)
        for sec in SECTIONS:
            if cand.get(sec):
                c_cfg[sec] = merge_dicts(c_cfg.get(sec) or {}, cand[sec])
        for job in plan_jobs(c_cfg, data, out, fp["checkpoint"], "VAL_SET", methods=cand.get("methods", ["qgait"]),
                             bits_list=[bits], seeds=seeds):
            job["name"] = f"{cand['name']}--{job['name']}"
            job["host_cfg"]["trainer_cfg"]["save_name"] = job["name"]
            jobs.append(job)
            owners.append(cand["name"])
    records = run_jobs(jobs, out / "runs", workers, progress, tag="tune")
    by_cand: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for owner, rec in zip(owners, records):
        by_cand.setdefault(owner, {}).setdefault(rec["method"], []).append(rec)
    # a candidate that changes a shared knob (qat:) runs its own lsq and is compared with it;
    # the others are compared with the first candidate's lsq, the baseline
    baseline = next((runs["lsq"] for runs in by_cand.values() if "lsq" in runs), [])
    rows = []
    for cand in grid["candidates"]:
        own = by_cand.get(cand["name"], {})
        lsq = own.get("lsq", baseline)
        for method, runs in own.items():
            row = {"candidate": cand["name"], "method": method, "note": cand.get("note", ""),
                   "overrides": {k: cand[k] for k in SECTIONS if k in cand},
                   "val_mean": mean_std([r["rank1"]["mean"] for r in runs]),
                   "val": {c: mean_std([r["rank1"][c] for r in runs]) for c in ("NM", "BG", "CL")},
                   "val_mAP": mean_std([r["mAP"] for r in runs]),
                   "vs_lsq": _paired(runs, lsq) if lsq and method != "lsq" else None,
                   "curve": _mean_curve(runs), "wall_seconds": sum(r["wall_seconds"] for r in runs)}
            rows.append(row)
    log = {"bits": bits, "seeds": seeds, "iters": base["qat"]["iters"], "rows": rows, "runs": len(records),
           "wall_seconds": time.time() - t0, "split": "VAL_SET", "fp_reference": fp["checkpoint"],
           "date": time.strftime("%Y-%m-%d %H:%M")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_log.json").write_text(json.dumps(log, indent=1))
    (out / "tune_log.md").write_text(tune_markdown(log) + "\n")
    return log


def _mean_curve(runs: List[Dict[str, Any]]) -> List[List[float]]:
    vals: Dict[int, List[float]] = {}
    for r in runs:
        for v in r.get("val_history", []):
            vals.setdefault(int(v["iteration"]), []).append(float(v["rank1"]["mean"]))
    return [[it, sum(v) / len(v)] for it, v in sorted(vals.items())]


def tune_markdown(log: Mapping[str, Any]) -> str:
    lines = [f"Tuning at W{log['bits']}A{log['bits']}, {log['iters']} iterations, seeds {log['seeds']}, "
             f"validation subjects only; {log['runs']} runs, {log['wall_seconds'] / 60:.1f} min ({log['date']}).", "",
             "| candidate | method | val mean rank-1 | NM | BG | CL | − lsq [95 % CI] | overrides |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(log["rows"], key=lambda r: -r["val_mean"]["mean"]):
        vs = r["vs_lsq"]
        d = f"{vs['mean']:+.2f} [{vs['low']:+.2f}, {vs['high']:+.2f}]" if vs else "—"
        ov = json.dumps(r["overrides"], separators=(",", ":")) if r["overrides"] else ""
        lines.append(f"| {r['candidate']} | {r['method']} | {r['val_mean']['mean']:.2f} ± {r['val_mean']['std']:.2f} | "
                     f"{r['val']['NM']['mean']:.1f} | {r['val']['BG']['mean']:.1f} | {r['val']['CL']['mean']:.1f} | "
                     f"{d} | `{ov}` |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default=None, help="tuning grid YAML (default configs/bench/tune.yaml)")
    p.add_argument("--config", default=None, help="benchmark YAML (default configs/bench/accuracy.yaml)")
    p.add_argument("--out", default="runs/bench-tune", help="output folder (tune_log.md/json, per-run records)")
    p.add_argument("--cache", default="runs/bench-cache", help="cache folder shared with `qgait bench accuracy`")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    cfg = load_bench_config(Path(args.config) if args.config else default_config_path(), quick=args.quick)
    grid_path = Path(args.grid) if args.grid else default_config_path().parent / "tune.yaml"
    grid = load_grid(grid_path)
    if args.quick:
        grid = dict(grid, seeds=grid["seeds"][:1], iters=2)
    log = run_tuning(cfg, grid, Path(args.out), Path(args.cache), progress=not args.no_progress,
                     workers=args.workers)
    print(tune_markdown(log))
    return 0
