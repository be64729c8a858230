"""The CASIA-B evaluation protocol, on embeddings: one implementation for every user.

Used by the built-in host's evaluator (:mod:`qgait_plugin.local.evaluate`) and by the generated
set's difficulty probe (:mod:`qgait_plugin.synth.difficulty`); it sits below both, so neither
imports the other.

Protocol (CASIA-B's, as OpenGait evaluates it; the type names are :mod:`qgait_plugin.layout`'s):
gallery = ``nm-01..04``; probe conditions NM = ``nm-05/06``, BG = ``bg-01/02``, CL = ``cl-01/02``.
For every (probe view, gallery view) pair with *different* views, rank-1 is the fraction of probe
sequences whose nearest gallery sequence of that gallery view has the probe's id. The pairs are
averaged per probe view, then over probe views (OpenGait's "excluding identical-view cases"); the
three conditions' rank-1 values are averaged into ``mean``.
Distance is OpenGait's ``euc``: the Euclidean distance per part, averaged over parts (``cos``: one
minus the cosine similarity per part, averaged). mAP uses the same pairs: the average precision of
each probe's ranking of the gallery view's sequences, averaged like rank-1.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .layout import GALLERY_TYPES, PROBE_TYPES, DataError


def distance(x: torch.Tensor, y: torch.Tensor, metric: str = "euc") -> torch.Tensor:
    """``[n, c, p]`` x ``[m, c, p]`` -> ``[n, m]`` part-averaged distance."""
    x, y = x.permute(2, 0, 1).double(), y.permute(2, 0, 1).double()  # [p, n, c]
    if metric == "cos":
        return 1 - F.normalize(x, dim=-1).matmul(F.normalize(y, dim=-1).transpose(1, 2)).mean(0)
    d2 = (x * x).sum(-1).unsqueeze(2) + (y * y).sum(-1).unsqueeze(1) - 2 * x.matmul(y.transpose(1, 2))
    return d2.clamp_min(0).sqrt().mean(0)


def _average_precision(match: np.ndarray) -> float:
    """AP of one ranking given its boolean relevance vector in rank order (0 when nothing is relevant)."""
    if not match.any():
        return float("nan")
    hits = np.cumsum(match)
    return float((hits / np.arange(1, len(match) + 1))[match].mean())


def casia_b_protocol(emb: torch.Tensor, ids: Sequence[str], types: Sequence[str], views: Sequence[str],
                     metric: str = "euc", per_subject: bool = False) -> Dict[str, Any]:
    """Rank-1 per condition (identical views excluded), their mean, per-view rank-1 and mAP.

    ``emb`` is ``[n, c, p]`` (``p`` parts; a plain embedding is ``[n, c, 1]``). Returns
    ``{"rank1": {NM, BG, CL, mean}, "rank1_per_view": {cond: {view: value}}, "mAP": float,
    "mAP_per_condition": {...}}``; accuracies in percent. Pairs with no probe or no gallery sequence
    are skipped (generated sets may lack some views or types), and so is a condition with no pair.

    ``per_subject`` adds ``"rank1_per_subject": {cond: {id: percent}}``: each probe subject's share
    of correct rank-1 matches over all its (probe view, gallery view) pairs of that condition. When
    every subject has the same probes (a complete set), their mean is the condition's rank-1; paired
    comparisons between two models use these per-subject values.
    """
    ids_a, types_a, views_a = np.asarray(ids), np.asarray(types), np.asarray(views)
    dist = distance(emb, emb, metric).numpy()
    view_list = sorted(set(views))
    gal_type = np.isin(types_a, GALLERY_TYPES)
    rank1: Dict[str, float] = {}
    per_view: Dict[str, Dict[str, float]] = {}
    maps: Dict[str, float] = {}
    subj_hits: Dict[str, Dict[str, List[float]]] = {}
    for cond, ptypes in PROBE_TYPES.items():
        probe_type = np.isin(types_a, ptypes)
        view_acc, view_ap = {}, []
        for pv in view_list:
            pmask = probe_type & (views_a == pv)
            if not pmask.any():
                continue
            accs: List[float] = []
            aps: List[float] = []
            for gv in view_list:
                if gv == pv:
                    continue
                gmask = gal_type & (views_a == gv)
                if not gmask.any():
                    continue
                d = dist[np.ix_(pmask, gmask)]
                order = np.argsort(d, axis=1, kind="stable")
                match = ids_a[gmask][order] == ids_a[pmask][:, None]
                accs.append(float(match[:, 0].mean()))
                if per_subject:
                    hits = subj_hits.setdefault(cond, {})
                    for sid, hit in zip(ids_a[pmask], match[:, 0]):
                        hits.setdefault(str(sid), []).append(float(hit))
                aps.append(float(np.nanmean([_average_precision(m) for m in match])) if match.any() else 0.0)
            if accs:
                view_acc[pv] = float(np.mean(accs) * 100)
                view_ap.append(float(np.mean(aps) * 100))
        if view_acc:
            per_view[cond] = view_acc
            rank1[cond] = float(np.mean(list(view_acc.values())))
            maps[cond] = float(np.mean(view_ap))
    if not rank1:
        raise DataError("casia_b_protocol: no probe/gallery pairs found; types must include "
                        f"{GALLERY_TYPES} and probes {PROBE_TYPES}, got {sorted(set(types))}")
    present = [rank1[c] for c in PROBE_TYPES if c in rank1]
    rank1["mean"] = float(np.mean(present))
    out: Dict[str, Any] = {"rank1": rank1, "rank1_per_view": per_view, "mAP": float(np.mean(list(maps.values()))),
                           "mAP_per_condition": maps}
    if per_subject:
        out["rank1_per_subject"] = {c: {sid: 100.0 * float(np.mean(h)) for sid, h in sorted(d.items())}
                                    for c, d in subj_hits.items()}
    return out
