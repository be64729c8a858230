"""Results of the demo: a Markdown table, a JSON file and three PNG plots.

Kept apart from the demo's orchestration so the same output can be rebuilt from ``results.json``
(and plots can change without touching training).
"""
from __future__ import annotations

import json
import os
from typing import List, Mapping, Optional, Sequence

import numpy as np

CONDS = ("NM", "BG", "CL")


def markdown_table(results: Mapping[str, Mapping]) -> str:
    """One row per method: rank-1 per condition and mean, mAP, bits, size, train time (for a post-training
    quantized model, ``*_ptq``, the wall time of its calibration)."""
    head = ("| method | W/A bits | NM | BG | CL | mean | mAP | size (bytes) | train or calibrate (s) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for name, r in results.items():
        rk = r["rank1"]
        bits = "fp32" if r["weight_bits"] == 32 else f"W{r['weight_bits']}A{r['act_bits']}"
        rows.append(f"| {name} | {bits} | {rk['NM']:.1f} | {rk['BG']:.1f} | {rk['CL']:.1f} | {rk['mean']:.1f} | "
                    f"{r['mAP']:.1f} | {r['size_bytes']:,} | {r['train_seconds']:.0f} |")
    return "\n".join(rows)


def write_tables(out_dir: str, results: Mapping[str, Mapping], extra: Optional[Mapping] = None) -> str:
    """``results.json`` (methods + any ``extra`` metadata) and ``results.md``; returns the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"methods": results, **dict(extra or {})}, f, indent=2)
    md = markdown_table(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("# qgait demo results\n\nRank-1 (%) on the generated set, CASIA-B protocol (identical views "
                "excluded); mAP (%); size at stored bit widths.\n\n" + md + "\n")
    return md


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(path: str, results: Mapping[str, Mapping]) -> None:
    """Grouped bars: rank-1 per condition (and mean) for each method."""
    plt = _plt()
    names = list(results)
    groups = list(CONDS) + ["mean"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, n in enumerate(names):
        vals = [results[n]["rank1"][g] for g in groups]
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, vals, width, label=n)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("rank-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=len(names))
    ax.set_title("Rank-1 per probe condition")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distances(path: str, distances: Mapping[str, np.ndarray]) -> None:
    """Histograms of inter-class embedding distances, FP against each quantized model.

    Distances are divided by the model's own mean so the shapes compare (IDD matches relative
    distances, not absolute ones).
    """
    plt = _plt()
    others = [n for n in distances if n != "fp"]
    fig, axes = plt.subplots(1, max(1, len(others)), figsize=(3.2 * max(1, len(others)), 3), sharey=True)
    axes = np.atleast_1d(axes)
    fp = distances["fp"] / max(distances["fp"].mean(), 1e-12)
    bins = np.linspace(0, max(2.5, float(np.quantile(fp, 0.999))), 60)
    for ax, n in zip(axes, others):
        d = distances[n] / max(distances[n].mean(), 1e-12)
        ax.hist(fp, bins, density=True, alpha=0.5, label="fp")
        ax.hist(d, bins, density=True, alpha=0.5, label=n)
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("inter-class distance / mean")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(path: str, histories: Mapping[str, Sequence[Mapping]]) -> None:
    """Total loss per iteration for every method (FP on its own axis: it trains far longer)."""
    plt = _plt()
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.5))

    def smooth(values: List[float], k: int = 5) -> np.ndarray:
        v = np.asarray(values, dtype=float)
        if len(v) < k:
            return v
        return np.convolve(v, np.ones(k) / k, mode="valid")

    for n, h in histories.items():
        if not h:
            continue
        ax = a0 if n == "fp" else a1
        raw = [r["loss"] for r in h]
        y = smooth(raw)
        ax.plot(np.arange(len(y)) + 1 + (len(raw) - len(y)), y, label=n)
    a0.set_title("FP training")
    a1.set_title("QAT fine-tuning from FP (QGait's loss includes IDD)")
    for ax in (a0, a1):
        ax.set_xlabel("iteration")
        ax.set_ylabel("total loss (5-iter mean)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
