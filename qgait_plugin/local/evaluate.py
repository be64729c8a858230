"""Evaluation for the built-in host: embedding extraction, the CASIA-B protocol, and its one-line summary.

The protocol itself (rank-1 per condition and view, mAP, part-averaged distances) is
:mod:`qgait_plugin.protocol`, shared with the generated set's difficulty probe; it is re-exported here.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..errors import NonFiniteError
from ..protocol import casia_b_protocol, distance

__all__ = ["casia_b_protocol", "distance", "extract_embeddings", "format_rank1", "inter_class_distances"]


def format_rank1(res: Dict[str, Any]) -> str:
    """One line of :func:`casia_b_protocol`'s result: rank-1 per condition, their mean, mAP."""
    r = res["rank1"]
    return (f"rank-1 NM {r.get('NM', float('nan')):.2f}  BG {r.get('BG', float('nan')):.2f}  "
            f"CL {r.get('CL', float('nan')):.2f}  mean {r['mean']:.2f}  mAP {res['mAP']:.2f}")


@torch.no_grad()
def extract_embeddings(model: torch.nn.Module, seqs: List, device: torch.device, frames_limit: int = 0,
                       desc: str = "eval", batch: int = 16, progress: bool = True) -> torch.Tensor:
    """Embeddings ``[N, c, p]`` of every sequence, all frames in order (``all_ordered``).

    ``frames_limit`` > 0 keeps the first that many frames, bounding the cost of long sequences.
    Sequences of equal length are batched (the model is in eval mode, so batching changes nothing
    but speed); the output keeps the input order.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    clips = [s.frames[:frames_limit] if frames_limit else s.frames for s in seqs]
    by_len: Dict[int, List[int]] = {}
    for i, c in enumerate(clips):
        by_len.setdefault(c.shape[0], []).append(i)
    out: List[torch.Tensor] = [torch.empty(0)] * len(clips)
    with tqdm(total=len(clips), desc=desc, leave=False, dynamic_ncols=True, disable=not progress) as bar:
        for idx in by_len.values():
            for j in range(0, len(idx), batch):
                chunk = idx[j:j + batch]
                x = torch.stack([clips[i] for i in chunk]).to(device).float().div_(255.0)
                emb = model(x)["embeddings"].float().cpu()
                for i, e in zip(chunk, emb):
                    out[i] = e
                bar.update(len(chunk))
    model.train(was_training)
    emb = torch.stack(out)
    bad = int((~torch.isfinite(emb.flatten(1))).any(dim=1).sum())
    if bad:  # the protocol would rank NaN distances anyhow and print scores for a diverged model
        raise NonFiniteError(f"{bad} of {len(seqs)} sequences have non-finite embeddings (NaN or infinity); "
                             "the model diverged, so there is nothing to score")
    return emb


def inter_class_distances(emb: torch.Tensor, ids: Sequence[str], max_pairs: int = 20000, seed: int = 0) -> np.ndarray:
    """Distances between embeddings of different ids (a sample of at most ``max_pairs``), for plots."""
    d = distance(emb, emb).numpy()
    ids_a = np.asarray(ids)
    iu = np.triu_indices(len(ids_a), 1)
    diff = ids_a[iu[0]] != ids_a[iu[1]]
    vals = d[iu][diff]
    if len(vals) > max_pairs:
        vals = np.random.default_rng(seed).choice(vals, max_pairs, replace=False)
    return vals
