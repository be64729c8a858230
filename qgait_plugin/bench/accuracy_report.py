"""Tables, JSON and plots of the accuracy benchmark (and of tuning runs), from per-run records.

Kept apart from the runner so the report can be rebuilt from ``runs/*.json`` without training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .methods import ABLATIONS, ALL_METHODS, METHODS, PTQ_METHODS
from .stats import mean_std, paired_interval

CONDS = ("NM", "BG", "CL")
METRICS = CONDS + ("mean",)


def subject_scores(rec: Mapping[str, Any]) -> Dict[str, float]:
    """Per test subject, the mean over NM/BG/CL of its rank-1 (the per-subject share of the ``mean`` column)."""
    per = rec["rank1_per_subject"]
    ids = sorted(set.intersection(*(set(per[c]) for c in CONDS if c in per)))
    return {sid: float(np.mean([per[c][sid] for c in CONDS if c in per])) for sid in ids}


def _paired(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """Paired interval of ``a - b`` over the seeds both have and the subjects both were tested on."""
    by_seed_a = {r["seed"]: subject_scores(r) for r in a}
    by_seed_b = {r["seed"]: subject_scores(r) for r in b}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if not seeds:
        return None
    subjects = sorted(set.intersection(*(set(by_seed_a[s]) & set(by_seed_b[s]) for s in seeds)))
    if len(subjects) < 2:
        return None
    d = np.array([[by_seed_a[s][i] - by_seed_b[s][i] for i in subjects] for s in seeds])
    return paired_interval(d).as_dict()


def check_records_agree(records: Sequence[Mapping[str, Any]], where: str = "the runs") -> Dict[str, Any]:
    """The provenance every record shares (data set and seed, FP reference, code version); records that
    disagree are a :class:`~qgait_plugin.errors.DamagedFile` naming both sides, since a table over them
    would pair runs of different data or references."""
    from ..errors import DamagedFile

    first: Optional[Mapping[str, Any]] = None
    for r in records:
        prov = r.get("provenance")
        if prov is None:
            raise DamagedFile(f"{where}: run {r.get('name')!r} does not say which data, FP reference and code made "
                              "it (a record of an older qgait); run the benchmark again")
        if first is None:
            first = r
        elif prov != first["provenance"]:
            diff = sorted(k for k in set(prov) | set(first["provenance"]) if prov.get(k) != first["provenance"].get(k))
            raise DamagedFile(f"{where}: runs {first.get('name')!r} and {r.get('name')!r} disagree on "
                              + ", ".join(f"{k} ({first['provenance'].get(k)!r} vs {prov.get(k)!r})" for k in diff)
                              + "; the folder mixes two benchmarks. Rerun into an empty --out")
    return dict(first["provenance"]) if first is not None else {}


def summarize(cfg: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Per bit width and method: mean/std over seeds of every metric, wall time, and the paired
    differences to ``lsq`` (and ``fp_continued - lsq``, the gap there is to close); plus the floors.
    Records that disagree on their data or FP reference are refused (:func:`check_records_agree`)."""
    check_records_agree(records)
    by: Dict[str, Dict[int, List[Mapping[str, Any]]]] = {}
    for r in records:
        by.setdefault(r["method"], {}).setdefault(int(r["bits"]), []).append(r)
    fp_runs = {m: by.get(m, {}).get(32, []) for m in ("fp_continued", "fp")}
    bits_list = sorted({int(r["bits"]) for r in records if r["method"] not in fp_runs}, reverse=True)
    table: Dict[str, Dict[str, Any]] = {}
    for bits in bits_list:
        rows: Dict[str, Any] = {}
        for method in ALL_METHODS:
            runs = fp_runs[method] if method in fp_runs else by.get(method, {}).get(bits, [])
            if not runs:
                continue
            row: Dict[str, Any] = {m: mean_std([r["rank1"][m] for r in runs]) for m in METRICS}
            row["mAP"] = mean_std([r["mAP"] for r in runs])
            row["wall_seconds"] = mean_std([r["wall_seconds"] for r in runs])
            row["train_seconds"] = mean_std([r["train_seconds"] for r in runs])  # PTQ: the calibration
            row["seeds"] = sorted(r["seed"] for r in runs)
            lsq = by.get("lsq", {}).get(bits, [])
            if method != "lsq" and lsq:
                row["vs_lsq"] = _paired(runs, lsq)
            ptq = by.get("ptq", {}).get(bits, [])
            if method in PTQ_METHODS and method != "ptq" and ptq:
                row["vs_ptq"] = _paired(runs, ptq)
            rows[method] = row
        table[f"W{bits}A{bits}"] = rows
    return {"table": table, "floors": check_floors(table), "ptq_floors": check_ptq_floors(table)}


#: the PTQ floors: W8A8 PTQ within this many points of the FP checkpoint's mean rank-1, in this many seconds
PTQ_W8_POINTS = 1.0
PTQ_W8_SECONDS = 60.0
#: ... and any calibration objective at W4A4 in this many seconds
PTQ_W4_OBJECTIVE_SECONDS = 300.0
#: ... and the PTQ part of the benchmark (every PTQ run, 2 workers on 2 cores) in this many minutes
PTQ_PART_MINUTES = 45.0


def check_ptq_floors(table: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """The PTQ floors on the benchmark's own numbers: ``ptq`` at W8A8 within :data:`PTQ_W8_POINTS` of ``fp``,
    calibrated in under :data:`PTQ_W8_SECONDS`; every objective at W4A4 calibrated in under
    :data:`PTQ_W4_OBJECTIVE_SECONDS`. Times are the calibration's (statistics, BatchNorm, objective; the
    checkpoint's ``train_seconds``), the test evaluation not included (the table's wall column has it)."""
    out: Dict[str, Any] = {}
    w8 = table.get("W8A8", {})
    if "ptq" in w8 and "fp" in w8:
        gap = w8["fp"]["mean"]["mean"] - w8["ptq"]["mean"]["mean"]
        secs = w8["ptq"]["train_seconds"]["mean"]
        out["W8A8_ptq"] = {"fp": w8["fp"]["mean"]["mean"], "ptq": w8["ptq"]["mean"]["mean"], "gap": gap,
                           "calibrate_seconds": secs, "met": bool(gap <= PTQ_W8_POINTS and secs < PTQ_W8_SECONDS)}
    w4 = table.get("W4A4", {})
    slow = {m: r["train_seconds"]["mean"] for m, r in w4.items() if m in PTQ_METHODS and m != "ptq"}
    if slow:
        out["W4A4_objectives"] = {"calibrate_seconds": slow, "met": bool(max(slow.values()) < PTQ_W4_OBJECTIVE_SECONDS)}
    return out


def check_floors(table: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """The benchmark's targets, evaluated on its own numbers.

    - Where ``lsq`` loses >= 2 points of mean rank-1 to ``fp_continued``: ``qgait`` closes at least a
      third of that gap and its paired interval against ``lsq`` is above 0.
    - Elsewhere ``qgait`` is not below ``lsq`` (the interval's upper end >= 0).
    - At W8A8 every quantized method is within 0.5 point of ``fp_continued``.
    """
    out: Dict[str, Any] = {}
    for key, rows in table.items():
        if "lsq" not in rows or "fp_continued" not in rows or "qgait" not in rows:
            continue
        fp, lsq, qg = rows["fp_continued"]["mean"]["mean"], rows["lsq"]["mean"]["mean"], rows["qgait"]["mean"]["mean"]
        gap = fp - lsq
        ci = rows["qgait"].get("vs_lsq") or {}
        f: Dict[str, Any] = {"fp_continued": fp, "lsq": lsq, "qgait": qg, "lsq_gap": gap,
                             "qgait_minus_lsq": ci.get("mean"), "ci": [ci.get("low"), ci.get("high")]}
        if gap >= 2:
            closed = (qg - lsq) / gap
            f["regime"] = "quantization costs accuracy"
            f["closed_fraction"] = closed
            f["met"] = bool(closed >= 1 / 3 and (ci.get("low") or -1) > 0)
        else:
            f["regime"] = "small gap"
            f["met"] = bool(ci.get("high") is not None and ci["high"] >= 0)
        if key == "W8A8":
            worst = {m: fp - r["mean"]["mean"] for m, r in rows.items() if m != "fp_continued"}
            f["within_half_point"] = {m: bool(v <= 0.5) for m, v in worst.items()}
            f["met"] = bool(f["met"] and all(f["within_half_point"].values()))
        out[key] = f
    return out


def _ci(vs: Optional[Mapping[str, float]]) -> str:
    return f"{vs['mean']:+.2f} [{vs['low']:+.2f}, {vs['high']:+.2f}]" if vs else "—"


def _fmt(ms: Mapping[str, float]) -> str:
    return f"{ms['mean']:.1f} ± {ms['std']:.1f}"


def markdown(summary: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None) -> str:
    """The tables as the README and the note show them."""
    lines: List[str] = []
    for key, rows in summary["table"].items():
        qat = {m: r for m, r in rows.items() if m in METHODS}
        if qat:
            lines += [f"### {key}", "",
                      "| method | NM | BG | CL | mean | mAP | mean − lsq [95 % CI] | seeds | wall (s/run) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for method, r in qat.items():
                lines.append(f"| {method} | {_fmt(r['NM'])} | {_fmt(r['BG'])} | {_fmt(r['CL'])} | {_fmt(r['mean'])} | "
                             f"{_fmt(r['mAP'])} | {_ci(r.get('vs_lsq'))} | {len(r['seeds'])} | "
                             f"{r['wall_seconds']['mean']:.0f} |")
            lines.append("")
        ptq = {m: r for m, r in rows.items() if m == "fp" or m in PTQ_METHODS or (m == "lsq" and len(qat) < len(rows))}
        if any(m in PTQ_METHODS for m in ptq):
            lines += [f"### {key}: post-training quantization", "",
                      "| method | NM | BG | CL | mean | mAP | mean − ptq [95 % CI] | mean − lsq [95 % CI] | seeds | "
                      "calibrate (s/run) | wall (s/run) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for method, r in ptq.items():
                lines.append(f"| {method} | {_fmt(r['NM'])} | {_fmt(r['BG'])} | {_fmt(r['CL'])} | {_fmt(r['mean'])} | "
                             f"{_fmt(r['mAP'])} | {_ci(r.get('vs_ptq'))} | {_ci(r.get('vs_lsq'))} | "
                             f"{len(r['seeds'])} | {r['train_seconds']['mean']:.1f} | "
                             f"{r['wall_seconds']['mean']:.0f} |")
            lines.append("")
    fl = summary.get("floors") or {}
    if fl:
        lines += ["### Targets", "", "| bits | fp_continued | lsq | gap | qgait − lsq [95 % CI] | share of gap closed "
                  "| target | met |", "|---|---|---|---|---|---|---|---|"]
        for key, f in fl.items():
            ci = f["ci"]
            d = f"{f['qgait_minus_lsq']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci[0] is not None else "—"
            closed = f"{100 * f['closed_fraction']:.0f} %" if "closed_fraction" in f else "—"
            target = ("close ≥ 1/3, CI > 0" if f["regime"].startswith("quantization") else "CI not below 0")
            if key == "W8A8":
                target += "; all within 0.5 of FP"
            lines.append(f"| {key} | {f['fp_continued']:.1f} | {f['lsq']:.1f} | {f['lsq_gap']:.1f} | {d} | {closed} | "
                         f"{target} | {'yes' if f['met'] else 'no'} |")
        lines.append("")
    pf = summary.get("ptq_floors") or {}
    if pf:
        lines += ["### PTQ floors", ""]
        if "W8A8_ptq" in pf:
            f = pf["W8A8_ptq"]
            lines.append(f"- W8A8 ptq {f['ptq']:.1f} vs fp {f['fp']:.1f} (gap {f['gap']:+.1f}, target ≤ "
                         f"{PTQ_W8_POINTS:g}), calibrated in {f['calibrate_seconds']:.0f} s (target < "
                         f"{PTQ_W8_SECONDS:.0f} s): {'met' if f['met'] else 'not met'}")
        if "W4A4_objectives" in pf:
            f = pf["W4A4_objectives"]
            secs = ", ".join(f"{m} {v:.0f} s" for m, v in f["calibrate_seconds"].items())
            lines.append(f"- W4A4 calibration with an objective: {secs} (target < {PTQ_W4_OBJECTIVE_SECONDS:.0f} s): "
                         f"{'met' if f['met'] else 'not met'}")
        lines.append("")
    if meta:
        t = meta.get("timings_seconds", {})
        if pf and t.get("ptq_runs_run"):
            mins = t["ptq_runs"] / 60
            whole = t["ptq_runs_run"] == t.get("ptq_runs_total")
            lines += [f"- the PTQ part: {mins:.1f} min for {t['ptq_runs_run']:.0f} of its "
                      f"{t.get('ptq_runs_total', 0):.0f} runs in this invocation (target ≤ "
                      f"{PTQ_PART_MINUTES:.0f} min for all): "
                      + ("met" if whole and mins <= PTQ_PART_MINUTES else "not met" if mins > PTQ_PART_MINUTES
                         else "not measured as a whole (the other runs were resumed from earlier records)"), ""]
        if not (meta.get("config") or {}).get("qat", {}).get("eval_float64", True):
            lines += ["Quantized convs summed in float32 in every evaluation (qat.eval_float64: false), not in the "
                      "float64 that matches the integer runtime at near-ties.", ""]
        lines.append(f"Wall time: {t.get('total', 0) / 60:.1f} min in all (data {t.get('data', 0):.0f} s, FP reference "
                     f"{t.get('fp_reference', 0):.0f} s, QAT runs {t.get('qat_runs', 0):.0f} s, PTQ runs "
                     f"{t.get('ptq_runs', 0):.0f} s); "
                     f"{meta.get('machine', {}).get('cpu', '')}, {meta.get('date', '')}.")
    return "\n".join(lines)


def runs_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """Every run with its final mean rank-1, last validation, training and wall time."""
    lines = ["## Every run", "", "| run | mean rank-1 | last val mean | train (s) | wall (s) |",
             "|---|---|---|---|---|"]
    for r in records:
        val = r.get("val_history") or []
        last = f"{val[-1]['rank1']['mean']:.1f}" if val else "—"
        lines.append(f"| {r['name']} | {r['rank1']['mean']:.1f} | {last} | {r['train_seconds']:.0f} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def write_report(out: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                 meta: Mapping[str, Any]) -> None:
    """``results.md``, ``results.json``, ``accuracy.png``, ``paired.png``, ``curves.png``, ``fp_curve.png``."""
    from ..atomic import write_text_atomic
    from ..records import write_record

    md = markdown(summary, meta)
    write_text_atomic(str(out / "results.md"), "# qgait bench accuracy\n\nRank-1 (%) on TEST_SET, CASIA-B protocol "
                      "(identical views excluded), mean ± std over seeds; paired differences to lsq with 95 % "
                      "intervals over seeds and test subjects.\n\n" + md + "\n\n" + runs_markdown(records) + "\n")
    slim = [{k: v for k, v in r.items() if k not in ("history",)} for r in records]
    write_record(out / "results.json", {"summary": summary, "meta": meta, "runs": slim}, indent=1)
    plot_accuracy(out / "accuracy.png", summary)
    plot_paired(out / "paired.png", summary)
    plot_curves(out / "curves.png", records)
    if meta.get("fp_reference"):
        plot_fp_curve(out / "fp_curve.png", meta["fp_reference"]["curve"])


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(path: Path, summary: Mapping[str, Any]) -> None:
    """Mean rank-1 per bit width, one bar per method, error bars = std over seeds."""
    plt = _plt()
    keys = list(summary["table"])
    methods = [m for m in ALL_METHODS if any(m in summary["table"][k] for k in keys)]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(keys)), 4))
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, k in enumerate(keys):
            if m in summary["table"][k]:
                r = summary["table"][k][m]["mean"]
                xs.append(j + i * width - 0.4 + width / 2)
                ys.append(r["mean"])
                es.append(r["std"])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=m)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys)
    ax.set_ylabel("mean rank-1 (%), test")
    lows = [summary["table"][k][m]["mean"]["mean"] for k in keys for m in summary["table"][k]]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 10), min(100.0, max(lows) + 5))
    ax.legend(fontsize=7, ncol=4)
    ax.set_title("accuracy by bit width (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_paired(path: Path, summary: Mapping[str, Any]) -> None:
    """Each method minus lsq with its 95 % interval, per bit width (0 = no better than LSQ)."""
    plt = _plt()
    keys = list(summary["table"])
    methods = [m for m in ("fp_continued",) + ABLATIONS + PTQ_METHODS if any(m in summary["table"][k] for k in keys)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * max(1, len(keys)), 3.6), sharey=False, squeeze=False)
    for ax, k in zip(axes[0], keys):
        for i, m in enumerate(methods):
            vs = summary["table"][k].get(m, {}).get("vs_lsq")
            if not vs:
                continue
            ax.errorbar([vs["mean"]], [i], xerr=[[vs["mean"] - vs["low"]], [vs["high"] - vs["mean"]]], fmt="o",
                        capsize=3, color="C3" if m == "qgait" else "C0")
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods, fontsize=7)
        ax.set_title(f"{k}: method − lsq", fontsize=9)
        ax.set_xlabel("mean rank-1 difference (points)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Training loss (moving average) and validation rank-1 over iterations, per bit width and method (seed mean)."""
    plt = _plt()
    bits_list = sorted({int(r["bits"]) for r in records if r["method"] not in ("fp_continued", "fp")}, reverse=True)
    if not bits_list:
        return
    fig, axes = plt.subplots(2, len(bits_list), figsize=(3.4 * len(bits_list), 6), squeeze=False)
    for j, bits in enumerate(bits_list):
        for i, m in enumerate(METHODS):
            runs = [r for r in records if r["method"] == m and (int(r["bits"]) == bits or m == "fp_continued")]
            if not runs:
                continue
            losses = [np.asarray(r["history"]["loss"], dtype=float) for r in runs if "history" in r]
            if losses:
                n = min(len(x) for x in losses)
                mean = np.mean([x[:n] for x in losses], axis=0)
                k = max(1, n // 20)
                smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
                axes[0][j].plot(np.arange(len(smooth)) + k, smooth, lw=1, label=m, color=f"C{i}")
            vals: Dict[int, List[float]] = {}
            for r in runs:
                for v in r.get("val_history", []):
                    vals.setdefault(int(v["iteration"]), []).append(float(v["rank1"]["mean"]))
            if vals:
                its = sorted(vals)
                axes[1][j].plot(its, [np.mean(vals[t]) for t in its], "o-", ms=3, lw=1, label=m, color=f"C{i}")
        axes[0][j].set_title(f"W{bits}A{bits}: training loss", fontsize=9)
        axes[1][j].set_title(f"W{bits}A{bits}: validation rank-1", fontsize=9)
        axes[1][j].set_xlabel("iteration", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fp_curve(path: Path, curve: Sequence[Mapping[str, Any]]) -> None:
    """The FP reference's validation rank-1 and training loss until it plateaued."""
    plt = _plt()
    its = [c["iteration"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for cond in METRICS:
        ax.plot(its, [c["val_rank1"][cond] for c in curve], "o-" if cond == "mean" else "-", ms=3, lw=1.5 if
                cond == "mean" else 0.8, label=cond)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation rank-1 (%)")
    ax2 = ax.twinx()
    ax2.plot(its, [c["loss"] for c in curve], "k--", lw=0.8, label="loss")
    ax2.set_ylabel("training loss")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("FP reference: trained until validation rank-1 plateaued")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
