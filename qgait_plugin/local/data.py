"""OpenGait-format silhouette data for the built-in host.

Layout (OpenGait's, read through :mod:`qgait_plugin.layout`): ``root/<id>/<type>/<view>/*.pkl``, each
pickle a uint8 array ``[frames, 64, 64]``, plus a partition JSON ``{"TRAIN_SET": [...], "TEST_SET":
[...]}``. The cutting transform drops
``w // 64 * 10`` columns on each side (64 -> 44) and scales to [0, 1]. For CPU speed the host can
also downsample once at load time (e.g. to 32 x 22): sequences are cut, resized and cached in memory
as uint8, so training never touches the disk or resizes again.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..layout import list_sequences, read_partition, read_sequence


@dataclass
class SilSequence:
    """One silhouette sequence: cut and resized frames (uint8 ``[T, H, W]``) and its labels."""

    sid: str
    type: str
    view: str
    frames: torch.Tensor


def cut_and_resize(frames: np.ndarray, resolution: Optional[Sequence[int]] = None) -> torch.Tensor:
    """OpenGait's cutting transform (64 -> 44 columns), then an area resize to ``resolution`` (uint8 out)."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    if x.dim() != 3:
        raise ValueError(f"expected frames [T, H, W], got shape {tuple(x.shape)}")
    cut = x.shape[-1] // 64 * 10
    if cut:
        x = x[..., cut:-cut]
    if resolution is not None and tuple(x.shape[-2:]) != tuple(resolution):
        y = F.interpolate(x[:, None].float(), size=tuple(resolution), mode="area")[:, 0]
        x = y.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def load_sequences(root: str, ids: Sequence[str], resolution: Optional[Sequence[int]] = None,
                   progress: bool = False, partition: Optional[str] = None) -> List[SilSequence]:
    """Every sequence of the given subject ids under ``root``, loaded into memory.

    Every file is checked as :func:`~qgait_plugin.layout.read_sequence` says (uint8 ``[T, H, W]``,
    ``T >= 1``), and every id must have sequences (``partition``, the file that listed the ids, is
    named when one has none)."""
    if not os.path.isdir(root):
        raise ConfigError(f"data_cfg.dataset_root: {root} is not a directory")
    from tqdm import tqdm

    files = list_sequences(root, ids, partition=partition)
    seqs = [SilSequence(f.sid, f.type, f.view, cut_and_resize(read_sequence(f.path), resolution))
            for f in tqdm(files, desc="load data", leave=False, dynamic_ncols=True, disable=not progress)]
    if not seqs:
        raise ConfigError(f"data_cfg.dataset_root: no .pkl sequences found under {root} for {len(ids)} ids")
    return seqs


_CACHE: Dict[Tuple, List[SilSequence]] = {}


def load_split(data_cfg: dict, split: str, progress: bool = True) -> List[SilSequence]:
    """TRAIN_SET or TEST_SET sequences of the configured data set, memoised when ``cache`` is on."""
    if not os.path.isfile(data_cfg["dataset_partition"]):
        raise ConfigError(f"data_cfg.dataset_partition: {data_cfg['dataset_partition']} not found")
    part = read_partition(data_cfg["dataset_partition"])
    res = tuple(data_cfg["resolution"])
    key = (os.path.abspath(data_cfg["dataset_root"]), os.path.abspath(data_cfg["dataset_partition"]), split, res)
    if data_cfg.get("cache") and key in _CACHE:
        return _CACHE[key]
    seqs = load_sequences(data_cfg["dataset_root"], part[split], res, progress=progress,
                          partition=data_cfg["dataset_partition"])
    if data_cfg.get("cache"):
        _CACHE[key] = seqs
    return seqs


class TripletSampler:
    """P identities x K sequences per batch, drawn at random (with replacement when an id has < K)."""

    def __init__(self, seqs: Sequence[SilSequence], p: int, k: int, seed: int = 0):
        self.by_id: Dict[str, List[int]] = {}
        for i, s in enumerate(seqs):
            self.by_id.setdefault(s.sid, []).append(i)
        self.ids = sorted(self.by_id)
        if len(self.ids) < p:
            raise ConfigError(f"trainer_cfg.sampler.batch_size: P={p} but the training set has only "
                              f"{len(self.ids)} identities")
        self.p, self.k = p, k
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            yield self.sample()

    def sample(self) -> List[int]:
        """One batch of sequence indices, grouped by identity."""
        out = []
        for sid in self.rng.sample(self.ids, self.p):
            pool = self.by_id[sid]
            out += self.rng.sample(pool, self.k) if len(pool) >= self.k else self.rng.choices(pool, k=self.k)
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])


def collate_fixed(seqs: Sequence[SilSequence], indices: Sequence[int], frames: int, rng: random.Random,
                  label_of: Dict[str, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fixed_unordered`` frames: ``frames`` random frames per sequence -> float ``[n, s, h, w]`` in [0, 1]."""
    batch = []
    for i in indices:
        x = seqs[i].frames
        t = x.shape[0]
        pick = rng.sample(range(t), frames) if t >= frames else rng.choices(range(t), k=frames)
        batch.append(x[pick])
    sils = torch.stack(batch).float().div_(255.0)
    labels = torch.tensor([label_of[seqs[i].sid] for i in indices], dtype=torch.long)
    return sils, labels
