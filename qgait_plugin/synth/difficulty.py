"""A quick difficulty probe for a generated set: rank-1 of a small GEI network, CASIA-B protocol.

Why: the generator's knobs should make the set hard but learnable for the built-in host's model,
and tuning them by training that model each time is slow. Gait energy images (mean silhouettes)
with a tiny CNN trained on ``TRAIN_SET`` give a fast, rough proxy: it sees less than a sequence
model (no frame order, no set pooling), so expect it somewhat below the real model.

Protocol: the built-in host's CASIA-B protocol (:func:`qgait_plugin.protocol.casia_b_protocol`):
gallery nm-01..04, probes NM (nm-05/06), BG (bg-01/02), CL (cl-01/02); rank-1 per (probe view,
gallery view) pair excluding identical views, averaged per probe view, then over views.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..layout import PARTITION_NAME, PROBE_TYPES, list_sequences, read_partition, read_sequence
from ..protocol import casia_b_protocol


def load_geis(root: os.PathLike, ids: List[str], size: Tuple[int, int] = (32, 22)
              ) -> Tuple[torch.Tensor, List[Tuple[str, str, str]]]:
    """GEIs ``[N, 1, *size]`` of every sequence of ``ids`` (44-column cut, as OpenGait's transform)."""
    geis, info = [], []
    for seq in list_sequences(root, ids):
        arr = read_sequence(seq.path)
        x = torch.from_numpy(arr[:, :, 10:54].astype(np.float32) / 255.0).mean(0)
        geis.append(nn.functional.interpolate(x[None, None], size=size, mode="area")[0])
        info.append((seq.sid, seq.type, seq.view))
    return torch.stack(geis), info


def _net(n_classes: int, dim: int = 64) -> Tuple[nn.Module, nn.Module]:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    body = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), nn.Flatten(), nn.LazyLinear(dim),
                         nn.BatchNorm1d(dim))
    return body, nn.Linear(dim, n_classes)


def rank1(emb: torch.Tensor, info: List[Tuple[str, str, str]]) -> Dict[str, float]:
    """CASIA-B rank-1 (%) per probe condition and their mean, cross-view pairs only, from embeddings
    ``[N, d]`` (Euclidean distance); a condition without probes is NaN."""
    ids, types, views = zip(*info)
    res = casia_b_protocol(emb[:, :, None], ids, types, views)["rank1"]
    return {**{c: res.get(c, float("nan")) for c in PROBE_TYPES}, "mean": res["mean"]}


def probe(root: os.PathLike, partition: Optional[os.PathLike] = None, epochs: int = 30, seed: int = 0,
          progress: bool = True) -> Dict[str, float]:
    """Train the GEI network on ``TRAIN_SET`` and return rank-1 (%) for NM, BG, CL and their mean."""
    part = read_partition(partition or Path(root) / PARTITION_NAME)
    torch.manual_seed(seed)
    xtr, itr = load_geis(root, part["TRAIN_SET"])
    xte, ite = load_geis(root, part["TEST_SET"])
    classes = sorted({i[0] for i in itr})
    y = torch.tensor([classes.index(i[0]) for i in itr])
    body, head = _net(len(classes))
    body(xtr[:2])
    opt = torch.optim.Adam(list(body.parameters()) + list(head.parameters()), 2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="gei probe", disable=not progress):
        body.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for k in range(0, len(xtr), 128):
            idx = perm[k:k + 128]
            x = xtr[idx]
            x = x + 0.05 * torch.randn(x.shape, generator=gen)  # light augmentation
            loss = nn.functional.cross_entropy(head(body(x)), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    body.eval()
    with torch.no_grad():
        emb = nn.functional.normalize(body(xte), dim=1)
    return rank1(emb, ite)
