"""``qgait bench accuracy``: does QGait beat plain LSQ? A benchmark powered to tell.

One run of the benchmark:

1. generates a CASIA-B-shaped set with disjoint ``TRAIN_SET``, ``VAL_SET`` and ``TEST_SET``
   subjects (cached by data seed and generator settings);
2. trains the full-precision reference until its validation rank-1 plateaus (cached by data and
   config, so every QAT run starts from the same checkpoint);
3. runs every method of :mod:`qgait_plugin.bench.methods` at every bit width for every seed, from
   that checkpoint, on the same budget, optimizer and learning-rate schedule, two runs at a time
   (one thread each) with validation curves along the way;
4. evaluates each final model once on ``TEST_SET`` and reports rank-1 per condition, mean and
   mAP as mean and standard deviation over seeds, and each method's paired difference to ``lsq``
   with a 95 % interval over seeds and test subjects (:mod:`qgait_plugin.bench.stats`).

Tuning (``qgait bench tune``) uses the same machinery but reads ``VAL_SET`` only. Everything is
driven by one YAML file (``configs/bench/accuracy.yaml``); ``--quick`` shrinks it to a smoke
test for CI.

Interrupts and reruns: every finished run is a record in ``OUT/runs`` (written atomically, with a
digest, :mod:`qgait_plugin.records`) that says which data set, FP reference and code version made
it. Ctrl-C or SIGTERM stops the worker processes at once and keeps every finished record; the same
command then resumes with the runs that are missing. One benchmark at a time writes into an
``--out`` folder (:mod:`qgait_plugin.lock`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import signal
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError, DamagedFile, InputNotFound, Interrupted
from ..records import read_record, write_record
from .methods import METHODS, PTQ_KNOBS, PTQ_LISTABLE, PTQ_METHODS, ptq_section, quant_section, switch_iteration

#: the sections and keys of the benchmark config (anything else is a typo, and an error)
CONFIG_KEYS: Dict[str, Tuple[str, ...]] = {
    "data": ("seed", "subjects", "train_subjects", "val_subjects", "frames", "views", "height", "width"),
    "fp": ("host", "val_every", "patience", "min_delta", "lr_drops", "max_iter"),
    "qat": ("iters", "seeds", "bits", "methods", "optimizer", "lr_drop", "val_every", "workers", "sampler",
            "eval_frames", "eval_float64"),
    "qgait": ("split", "alpha", "alpha_end", "idd", "step_lr_scale"),
    "kd": ("weight",),
    "ptq": ("methods",) + PTQ_KNOBS,
}
#: sections a benchmark config may leave out (no PTQ runs without ``ptq:``)
OPTIONAL_SECTIONS = ("ptq",)

#: ``--quick``: a smoke test of every method, bit width and seed in about a minute
QUICK: Dict[str, Any] = {
    "data": {"subjects": 12, "train_subjects": 6, "val_subjects": 3, "frames": 8, "views": [0, 90]},
    "fp": {"val_every": 4, "patience": 1, "max_iter": 8, "lr_drops": 0},
    "qat": {"iters": 2, "seeds": [0, 1], "val_every": 2, "sampler": {"batch_size": [3, 2], "frames_num_fixed": 3},
            "eval_frames": 4},
    "ptq": {"samples": 12, "batch": 6, "iters": 2},
    # merged into every run's host config (the FP reference's too)
    "host": {"data_cfg": {"resolution": [16, 11]},
             "model_cfg": {"channels": [4, 8, 8], "bin_num": [4], "SeparateFCs": {"out_channels": 8}},
             "trainer_cfg": {"sampler": {"batch_size": [3, 2], "frames_num_fixed": 3}},
             "evaluator_cfg": {"sampler": {"frames_all_limit": 4}}},
}


def default_config_path() -> Path:
    """``configs/bench/accuracy.yaml`` of the source tree."""
    p = Path(__file__).resolve().parents[2] / "configs" / "bench" / "accuracy.yaml"
    if not p.is_file():
        raise InputNotFound(f"{p}: benchmark config not found; pass --config FILE")
    return p


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content through the strict loader (duplicate keys, non-finite numbers, alias bombs
    and empty files are errors naming ``path``)."""
    from ..yamlfile import load_yaml

    return load_yaml(path, what)


def load_bench_config(path: Path, quick: bool = False) -> Dict[str, Any]:
    """Read and check the benchmark YAML; ``quick`` merges :data:`QUICK` over it."""
    from ..local.config import merge_dicts

    cfg = read_yaml(path, "benchmark config")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {list(CONFIG_KEYS)}")
    for sec, body in cfg.items():
        if sec not in CONFIG_KEYS:
            raise ConfigError(f"{path}: {sec}: unknown section; allowed: {list(CONFIG_KEYS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {sec}: expected a mapping, got {type(body).__name__}")
        for k in body:
            if k not in CONFIG_KEYS[sec]:
                raise ConfigError(f"{path}: {sec}.{k}: unknown key; allowed: {list(CONFIG_KEYS[sec])}")
    missing = [s for s in CONFIG_KEYS if s not in cfg and s not in OPTIONAL_SECTIONS]
    if missing:
        raise ConfigError(f"{path}: missing sections {missing}")
    host_over: Dict[str, Any] = {}
    if quick:
        q = copy.deepcopy(QUICK)
        host_over = q.pop("host")
        cfg = merge_dicts(cfg, q)
    cfg["_host_override"] = host_over
    cfg["_path"] = str(path)
    for m in cfg["qat"]["methods"]:
        if m not in METHODS:
            raise ConfigError(f"{path}: qat.methods: {m!r} is not one of {list(METHODS)}")
    for m in (cfg.get("ptq") or {}).get("methods") or []:
        if m not in PTQ_LISTABLE:
            raise ConfigError(f"{path}: ptq.methods: {m!r} is not one of {list(PTQ_LISTABLE)}")
    if cfg["qat"]["methods"] and "lsq" not in cfg["qat"]["methods"]:
        raise ConfigError(f"{path}: qat.methods must include lsq (the baseline of every paired difference), or be "
                          "empty for a PTQ-only benchmark (ptq.methods)")
    if not cfg["qat"]["methods"] and not (cfg.get("ptq") or {}).get("methods"):
        raise ConfigError(f"{path}: qat.methods and ptq.methods are both empty; nothing to run")
    if not isinstance(cfg["qat"].get("eval_float64", True), bool):
        raise ConfigError(f"{path}: qat.eval_float64: {cfg['qat']['eval_float64']!r}; expected true or false")
    if not cfg["qat"]["seeds"]:
        raise ConfigError(f"{path}: qat.seeds: give at least one seed")
    split = float(cfg["qgait"]["split"])
    if not 0 < split < 1:
        raise ConfigError(f"{path}: qgait.split: {split} must be in (0, 1): the share of the budget before the switch")
    return cfg


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# data and the FP reference (both cached)


def prepare_data(cfg: Mapping[str, Any], cache: Path, progress: bool = True) -> Path:
    """Generate (or reuse) the benchmark set; returns its folder. Cached by the generator settings."""
    from ..synth import generate_dataset

    d = dict(cfg["data"])
    folder = cache / f"data-seed{d['seed']}-{_digest(d)}"
    part = folder / "partition.json"
    if part.is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    generate_dataset(tmp, subjects=d["subjects"], seed=d["seed"], frames=d["frames"], views=d["views"],
                     height=d.get("height", 64), width=d.get("width", 56), workers=2, progress=progress,
                     val_subjects=d["val_subjects"], train_subjects=d["train_subjects"])
    os.replace(tmp, folder)
    return folder


def host_config(cfg: Mapping[str, Any], data: Path, out_root: Path, save_name: str, seed: int,
                extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The built-in host's config for one run: ``fp.host`` with paths, seed and ``extra`` merged in."""
    from ..local.config import load_config, merge_dicts

    host = Path(cfg["fp"]["host"])
    if not host.is_absolute():
        host = Path(cfg["_path"]).parent / host
    over: Dict[str, Any] = {
        "data_cfg": {"dataset_root": str(data), "dataset_partition": str(data / "partition.json")},
        "trainer_cfg": {"output_root": str(out_root), "save_name": save_name, "seed": seed},
    }
    if cfg.get("_host_override"):
        over = merge_dicts(over, cfg["_host_override"])
    if extra:
        over = merge_dicts(over, extra)
    return load_config(str(host), overrides=over)


def train_fp_reference(cfg: Mapping[str, Any], data: Path, cache: Path, progress: bool = True) -> Dict[str, Any]:
    """Train FP until validation rank-1 plateaus; cached by data and config. Returns checkpoint and curve.

    Every ``fp.val_every`` iterations the model is evaluated on ``VAL_SET``. When the mean rank-1
    has not improved by ``fp.min_delta`` for ``fp.patience`` evaluations, the learning rate drops
    x0.1 (up to ``fp.lr_drops`` times); the next plateau ends training (or ``fp.max_iter``).
    """
    from ..local.trainer import Trainer

    fp = dict(cfg["fp"])
    key = _digest({"data": cfg["data"], "fp": fp, "host_override": cfg.get("_host_override"),
                   "host": Path(_host_path(cfg)).read_text()})
    folder = cache / f"fp-{key}"
    done = folder / "fp_reference.json"
    if done.is_file():
        try:
            info = read_record(done, "FP reference record")
        except DamagedFile as e:
            print(f"[fp] {e}; training the FP reference again", file=sys.stderr, flush=True)
        else:
            if Path(info["checkpoint"]).is_file() and info.get("checkpoint_sha256") == file_sha256(info["checkpoint"]):
                return info
    hc = host_config(cfg, data, folder / "output", "fp", int(cfg["data"]["seed"]),
                     {"trainer_cfg": {"total_iter": 0, "save_iter": 0, "overwrite": True}})
    tr = Trainer(hc, progress=progress)
    curve: List[Dict[str, Any]] = []
    best, stale, drops = -1.0, 0, 0
    t0 = time.time()
    ckpt = None
    while tr.iteration < int(fp["max_iter"]):
        tr.cfg["trainer_cfg"]["total_iter"] = min(tr.iteration + int(fp["val_every"]), int(fp["max_iter"]))
        out = tr.train()
        ckpt = out["checkpoint"]
        res = tr.evaluate(split="VAL_SET")
        tr.model.train()
        hist = out["history"][-int(fp["val_every"]):]
        loss = sum(h["loss"] for h in hist) / max(1, len(hist))
        assert tr.optimizer is not None
        lr = tr.optimizer.param_groups[0]["lr"]
        curve.append({"iteration": tr.iteration, "val_rank1": res["rank1"], "val_mAP": res["mAP"], "loss": loss,
                      "lr": lr})
        if progress:
            print(f"[fp] iteration {tr.iteration}: val rank-1 mean {res['rank1']['mean']:.1f}, loss {loss:.3f}, "
                  f"lr {lr:.1e}", flush=True)
        if res["rank1"]["mean"] > best + float(fp["min_delta"]):
            best, stale = res["rank1"]["mean"], 0
        else:
            stale += 1
        if stale >= int(fp["patience"]):
            if drops >= int(fp["lr_drops"]):
                break
            drops, stale = drops + 1, 0
            for g in tr.optimizer.param_groups:
                g["lr"] *= 0.1
    info = {"checkpoint": ckpt, "checkpoint_sha256": file_sha256(ckpt) if ckpt else None, "curve": curve,
            "iterations": tr.iteration, "seconds": time.time() - t0, "plateaued": tr.iteration < int(fp["max_iter"])}
    write_record(done, info, indent=1)
    return info


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes: pins which checkpoint a record was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _host_path(cfg: Mapping[str, Any]) -> str:
    host = Path(cfg["fp"]["host"])
    return str(host if host.is_absolute() else Path(cfg["_path"]).parent / host)


# --------------------------------------------------------------------------------------------
# one QAT run (in a worker process)


def qat_overrides(cfg: Mapping[str, Any], method: str, bits: int, fp_ckpt: str, seed: int = 0) -> Dict[str, Any]:
    """Host-config overrides of one run: budget, optimizer, the shared LR drop, sampler, ``quant:``.

    A PTQ method's ``quant:`` is its calibration (``ptq:`` knobs, ``seed`` the calibration draw); the
    rest is shared, so its evaluation is the QAT runs' own."""
    q = cfg["qat"]
    iters = int(q["iters"])
    over: Dict[str, Any] = {
        # the benchmark owns its folders: a rerun with another config replaces a run's checkpoint
        "trainer_cfg": {"total_iter": iters, "save_iter": 0, "val_iter": int(q["val_every"]),
                        "restore_hint": 0, "sampler": dict(q["sampler"]), "overwrite": True},
        "optimizer_cfg": dict(q["optimizer"]),
        "scheduler_cfg": {"scheduler": "MultiStepLR", "milestones": [switch_iteration(iters, cfg["qgait"])],
                          "gamma": float(q["lr_drop"])},
        "evaluator_cfg": {"sampler": {"frames_all_limit": int(q["eval_frames"])}},
    }
    if method in PTQ_METHODS:
        quant: Optional[Dict[str, Any]] = ptq_section(method, bits, cfg.get("ptq") or {}, seed)
    elif method == "fp":
        quant = None
    else:
        quant = quant_section(method, bits, iters, cfg["qgait"], cfg["kd"])
    if quant is not None:
        quant["init_from"] = fp_ckpt
        over["quant"] = quant
    else:
        over["trainer_cfg"]["restore_hint"] = fp_ckpt  # continue the FP model (weights only)
    return over


def run_name(method: str, bits: int, seed: int) -> str:
    if method == "fp":
        return "fp_reference"
    return f"{method}-w{bits}a{bits}-s{seed}" if method != "fp_continued" else f"{method}-s{seed}"


def run_job(job: Mapping[str, Any]) -> Dict[str, Any]:
    """Train one method/bits/seed and evaluate it once on ``job['final_split']``; returns a JSON-able record.

    With ``job['eval_float64']`` false (``qat.eval_float64: false``), quantized convs sum in float32 in
    evaluation too (:func:`~qgait_plugin.quant.layers.float32_accumulation`), ~2.7x faster on the CPU."""
    import torch

    torch.set_num_threads(int(job["threads"]))
    if job.get("eval_float64", True):
        return _run_job(job)
    from ..quant.layers import float32_accumulation

    with float32_accumulation():
        return _run_job(job)


def _run_job(job: Mapping[str, Any]) -> Dict[str, Any]:
    from ..local.config import build_config
    from ..local.trainer import Trainer

    t0 = time.time()
    hc = build_config(job["host_cfg"], src=job["name"])
    if job["method"] in PTQ_METHODS:
        from ..local.calibrate_cmd import calibrate_checkpoint

        res = calibrate_checkpoint(hc, progress=False, announce=False, overwrite=True)
        tr = res["trainer"]
        out = {"history": [{"loss": v} for v in res["info"].get("loss", [])], "val_history": [],
               "train_seconds": res["info"]["seconds"]["total"], "checkpoint": str(res["checkpoint"])}
    elif job["method"] == "fp":
        tr = Trainer(hc, progress=False, announce=False)
        tr.restore(hc["trainer_cfg"]["restore_hint"], source="fp reference")
        out = {"history": [], "val_history": [], "train_seconds": 0.0,
               "checkpoint": str(hc["trainer_cfg"]["restore_hint"])}
    else:
        tr = Trainer(hc, progress=False, announce=False)  # the record names the FP checkpoint instead
        out = tr.train()
    last = tr.last_validation
    if job["final_split"] == "VAL_SET" and last is not None and last["iteration"] == tr.iteration:
        final = last  # the validation of the last iteration already is the final VAL_SET evaluation
    else:
        final = tr.evaluate(split=job["final_split"])
    hist = out["history"]
    keys = sorted({k for h in hist for k in h if isinstance(h[k], (int, float))})
    return {
        "name": job["name"], "method": job["method"], "bits": job["bits"], "seed": job["seed"],
        "checkpoint": out["checkpoint"], "checkpoint_sha256": file_sha256(out["checkpoint"]),
        "final_split": job["final_split"], "init_from": (hc.get("quant") and hc["quant"].init_from)
        or hc["trainer_cfg"]["restore_hint"],
        "rank1": final["rank1"], "mAP": final["mAP"], "rank1_per_subject": final["rank1_per_subject"],
        "val_history": out["val_history"],
        "history": {k: [h.get(k) for h in hist] for k in keys},
        "train_seconds": out["train_seconds"], "wall_seconds": time.time() - t0,
        "kind": "ptq" if job["method"] in PTQ_METHODS else "fp" if job["method"] == "fp" else "qat",
        "collapsed_steps": sum(out.get("collapsed_steps", {}).values()),
        "eval_float64": bool(job.get("eval_float64", True)),
    }


def plan_jobs(cfg: Mapping[str, Any], data: Path, out: Path, fp_ckpt: str, final_split: str,
              methods: Optional[Sequence[str]] = None, bits_list: Optional[Sequence[int]] = None,
              seeds: Optional[Sequence[int]] = None, threads: int = 1) -> List[Dict[str, Any]]:
    """The job list (one per method, bit width and seed; ``fp_continued`` once per seed)."""
    from .. import __version__
    from ..local.config import merge_dicts

    q = cfg["qat"]
    # what every record of this plan shares: readers refuse a folder whose records disagree on it
    provenance = {"data_seed": int(cfg["data"]["seed"]), "data": data.name, "fp_checkpoint": str(fp_ckpt),
                  "code_version": __version__}
    methods = list(methods or list(q["methods"]) + list((cfg.get("ptq") or {}).get("methods") or []))
    bits_list = list(bits_list or q["bits"])
    seeds = list(seeds if seeds is not None else q["seeds"])
    jobs = []
    for seed in seeds:
        for method in methods:
            if method == "fp" and seed != seeds[0]:
                continue  # the FP checkpoint evaluated: the same for every seed
            for bits in ([32] if method in ("fp_continued", "fp") else bits_list):
                name = run_name(method, bits, seed)
                base = host_config(cfg, data, out / "output", name, seed)
                over = qat_overrides(cfg, method, bits, fp_ckpt, seed)
                # the job's thread count wins over the host config's num_threads: two runs of 2 threads
                # each on 2 cores spin against each other (8x slower here, not 2x)
                over["trainer_cfg"]["num_threads"] = threads
                user = merge_dicts({k: v for k, v in base.items() if k != "quant"}, over)
                jobs.append({"name": name, "method": method, "bits": bits, "seed": seed, "final_split": final_split,
                             "threads": threads, "host_cfg": user, "provenance": dict(provenance),
                             "eval_float64": bool(q.get("eval_float64", True))})
    return jobs


def ptq_job_cost(job: Mapping[str, Any]) -> float:
    """A PTQ job's relative cost, for ordering: its objective iterations (0 for ``ptq`` and ``fp``;
    every run also has a calibration and the test evaluation)."""
    calib = (job["host_cfg"].get("quant") or {}).get("calibrate") or {}
    return float(calib.get("iters", 1)) if calib.get("objective", "none") != "none" else 0.0


def job_digest(job: Mapping[str, Any]) -> str:
    """What a finished record must match to stand for ``job``: its host config and final split."""
    return _digest(job["host_cfg"]) + job["final_split"] + ("" if job.get("eval_float64", True) else "-f32sums")


def _ignore_interrupts() -> None:
    """Worker initializer: Ctrl-C reaches the whole process group, and only the parent decides what stops.

    A worker that took SIGINT itself would hand a KeyboardInterrupt back as its job's result and
    take the next job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """For the block, SIGINT and SIGTERM both raise :class:`KeyboardInterrupt` in the main thread."""
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_pool(pool: ProcessPoolExecutor, grace: float = 3.0) -> None:
    """Cancel the queued jobs and end the running ones now (SIGTERM, then SIGKILL after ``grace`` s)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # the executor has no public handle
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    pool.shutdown(wait=True)  # the workers are gone: this only joins the executor's thread and frees its queues


def _resumable(path: Path, job: Mapping[str, Any], digest: str) -> Optional[Dict[str, Any]]:
    """The finished record of ``job`` at ``path``, or None when it must run (missing, damaged, other config)."""
    if not path.is_file():
        return None
    try:
        rec = read_record(path, "run record")
    except DamagedFile as e:
        print(f"[bench] {e}; running it again", file=sys.stderr, flush=True)
        return None
    if rec.get("digest") != digest or rec.get("provenance") != job.get("provenance"):
        return None
    return rec


def run_jobs(jobs: List[Dict[str, Any]], runs_dir: Path, workers: int, progress: bool = True,
             tag: str = "runs", fn: Callable[[Mapping[str, Any]], Dict[str, Any]] = run_job) -> List[Dict[str, Any]]:
    """Run ``jobs`` ``workers`` at a time (fresh processes, one thread each); a finished job whose
    record is on disk with the same config is not run again (an interrupted benchmark resumes).

    SIGINT or SIGTERM cancels the queued jobs, ends the running ones within seconds, writes the
    record of every job that finished and raises :class:`~qgait_plugin.errors.Interrupted`.
    ``fn`` runs one job in a worker (a test passes a cheap one).
    """
    from tqdm import tqdm

    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from ..atomic import output_error

        raise output_error(str(runs_dir), e) from None
    results: Dict[str, Dict[str, Any]] = {}
    todo = []
    for job in jobs:
        digest = job_digest(job)
        path = runs_dir / f"{job['name']}.json"
        rec = _resumable(path, job, digest)
        if rec is not None:
            results[job["name"]] = rec
            continue
        todo.append((job, digest, path))
    bar = tqdm(total=len(jobs), initial=len(results), desc=tag, unit="run", disable=not progress, dynamic_ncols=True)

    def keep(fut: Future, job: Mapping[str, Any], digest: str, path: Path) -> None:
        rec = fut.result()
        rec["digest"] = digest
        rec["provenance"] = job.get("provenance")
        write_record(path, rec)
        results[job["name"]] = rec
        bar.set_postfix_str(f"{job['name']}: {rec['rank1']['mean']:.1f}")
        bar.update(1)

    if todo:
        import multiprocessing as mp
        from concurrent.futures import as_completed

        futures: Dict[Future, Tuple[Dict[str, Any], str, Path]] = {}
        with interrupts_raise():
            pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn"),
                                       initializer=_ignore_interrupts)
            try:
                for job, digest, path in todo:
                    futures[pool.submit(fn, job)] = (job, digest, path)
                for fut in as_completed(futures):
                    keep(fut, *futures[fut])
            except KeyboardInterrupt as e:
                stop_pool(pool)
                # a job that finished while its record was being written, or just before the signal
                for fut, (job, digest, path) in futures.items():
                    if job["name"] not in results and fut.done() and not fut.cancelled() and fut.exception() is None:
                        keep(fut, job, digest, path)
                bar.close()
                signame = str(e) or "SIGINT"
                raise Interrupted(f"stopped by {signame}: {len(results)} of {len(jobs)} runs finished, their records "
                                  f"are kept in {runs_dir}; run the same command again to resume") from None
            except BaseException:
                stop_pool(pool)
                raise
            pool.shutdown(wait=True)
    bar.close()
    return [results[j["name"]] for j in jobs]


# --------------------------------------------------------------------------------------------
# the whole benchmark


def run_benchmark(cfg: Dict[str, Any], out: Path, cache: Path, progress: bool = True,
                  workers: Optional[int] = None) -> Dict[str, Any]:
    """Data, FP reference, every QAT run, then the tables, JSON and plots in ``out``.

    Holds the lock of ``out`` and of ``cache`` throughout: a second benchmark into either is refused."""
    from ..lock import output_lock

    with output_lock(str(out), "--out"), output_lock(str(cache), "--cache"):
        return _run_benchmark(cfg, out, cache, progress, workers)


def _run_benchmark(cfg: Dict[str, Any], out: Path, cache: Path, progress: bool,
                   workers: Optional[int]) -> Dict[str, Any]:
    from .accuracy_report import summarize, write_report

    t0 = time.time()
    timings: Dict[str, float] = {}
    data = prepare_data(cfg, cache, progress)
    timings["data"] = time.time() - t0
    fp = train_fp_reference(cfg, data, cache, progress)
    timings["fp_reference"] = time.time() - t0 - timings["data"]
    jobs = plan_jobs(cfg, data, out, fp["checkpoint"], "TEST_SET")
    n = workers or int(cfg["qat"]["workers"])
    t1 = time.time()
    records = run_jobs([j for j in jobs if j["method"] in METHODS], out / "runs", n, progress)
    timings["qat_runs"] = time.time() - t1
    t1 = time.time()
    # the PTQ part on its own, so its wall time is its own (the floor: at most 45 minutes on 2 cores);
    # longest runs first, so that no worker is left with an objective run while the other idles at the end
    ptq_jobs = sorted((j for j in jobs if j["method"] not in METHODS), key=ptq_job_cost, reverse=True)
    timings["ptq_runs_total"] = len(ptq_jobs)
    timings["ptq_runs_run"] = sum(_resumable(out / "runs" / f"{j['name']}.json", j, job_digest(j)) is None
                                  for j in ptq_jobs)
    ptq_records = run_jobs(ptq_jobs, out / "runs", n, progress, tag="ptq runs")
    records += [ptq_records[ptq_jobs.index(j)] for j in jobs if j["method"] not in METHODS]  # plan order
    timings["ptq_runs"] = time.time() - t1
    timings["total"] = time.time() - t0
    summary = summarize(cfg, records)
    meta = {"config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "config_file": cfg["_path"],
            "quick": bool(cfg.get("_host_override")),
            "data": str(data), "fp_reference": fp, "timings_seconds": timings, "machine": machine_info(),
            "provenance": jobs[0]["provenance"] if jobs else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    write_report(out, summary, records, meta)
    return {"summary": summary, "meta": meta}


def machine_info() -> Dict[str, Any]:
    """CPU model, core count and the torch version, for the report."""
    import platform

    import torch

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="benchmark YAML (default configs/bench/accuracy.yaml)")
    p.add_argument("--out", default="runs/bench-accuracy", help="output folder (tables, JSON, plots, per-run records)")
    p.add_argument("--cache", default="runs/bench-cache", help="cache folder for the generated set and FP reference")
    p.add_argument("--data-seed", type=int, default=None, help="run on another generated set (data.seed)")
    p.add_argument("--workers", type=int, default=None, help="runs in parallel (default qat.workers)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every method, bit width, seed")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    cfg = load_bench_config(Path(args.config) if args.config else default_config_path(), quick=args.quick)
    if args.data_seed is not None:
        cfg["data"]["seed"] = int(args.data_seed)
    from ..atomic import check_writable

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a folder")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: {args.workers}; give at least 1")
    check_writable(str(out), "--out")
    check_writable(args.cache, "--cache")
    res = run_benchmark(cfg, out, Path(args.cache), progress=not args.no_progress, workers=args.workers)
    print((out / "results.md").read_text())
    t = res["meta"]["timings_seconds"]
    print(f"[bench accuracy] wrote {out}/results.md, results.json, accuracy.png, paired.png, curves.png in "
          f"{t['total'] / 60:.1f} min (data {t['data']:.0f} s, FP {t['fp_reference']:.0f} s, "
          f"QAT {t['qat_runs']:.0f} s, PTQ {t.get('ptq_runs', 0):.0f} s)")
    return 0
