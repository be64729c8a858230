"""Generate a CASIA-B-shaped silhouette data set in OpenGait's format.

Structure: subjects ``001..N``, types ``nm-01..06``, ``bg-01..02``, ``cl-01..02``, views
``000..180`` in steps of 18; each sequence is rendered, noised and pretreated independently from a
seed derived from ``(seed, subject, type, view)``. Subject identity is drawn from ``(seed, subject)``
only, so every sequence of a person shares the same body and walking style. Nothing uses a global
RNG and nothing depends on the order or the process in which sequences are made, so a seed gives
the same bytes with any number of workers.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..layout import (
    CASIA_B_TYPES,
    CASIA_B_VIEWS,
    PARTITION_NAME,
    subject_id,
    view_name,
    write_partition,
    write_sequence,
)
from .body import Sequence as WalkSequence
from .body import sample_subject, walk_capsules, wobble_subject
from .pretreat import pretreat_batch
from .render import NoiseConfig, add_noise, project, rasterize


@dataclass(frozen=True)
class SynthConfig:
    """Everything that decides the generated pixels. Defaults are the ``qgait synth`` default set.

    Difficulty knobs: ``spread`` (between-subject variation of body and style; lower is harder),
    ``style_jitter`` (within-subject, per-sequence style wobble in population sds; higher is
    harder), ``speed_jitter`` (sd of walking speed per sequence), ``view_jitter`` (degrees),
    ``elevation`` / ``elevation_jitter`` (camera tilt, degrees), ``noise`` (segmentation noise).
    """

    subjects: int = 50
    seed: int = 0
    frames: int = 30
    views: Tuple[int, ...] = CASIA_B_VIEWS
    types: Tuple[str, ...] = CASIA_B_TYPES
    height: int = 96           # raw render height in pixels (the body is about 75 px tall)
    width: int = 84
    spread: float = 1.0
    style_jitter: float = 0.35
    speed_jitter: float = 0.07
    view_jitter: float = 3.0
    elevation: float = 4.0
    elevation_jitter: float = 2.0
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    def __post_init__(self) -> None:
        if self.subjects < 2:
            raise ConfigError(f"SynthConfig.subjects: need at least 2 (train and test), got {self.subjects}")
        if self.frames < 1:
            raise ConfigError(f"SynthConfig.frames: need at least 1, got {self.frames}")
        for t in self.types:
            if t not in CASIA_B_TYPES:
                raise ConfigError(f"SynthConfig.types: unknown type {t!r}; allowed: {list(CASIA_B_TYPES)}")
        for v in self.views:
            if not 0 <= int(v) <= 180:
                raise ConfigError(f"SynthConfig.views: view {v!r} outside 0..180 degrees")
            if int(v) not in CASIA_B_VIEWS:  # the protocol and the folder names (``018``) assume the grid
                raise ConfigError(f"SynthConfig.views: view {v!r} is not on CASIA-B's 18-degree grid; allowed: "
                                  f"{list(CASIA_B_VIEWS)}")
        if len(set(self.views)) != len(self.views):
            raise ConfigError(f"SynthConfig.views: {list(self.views)} names a view twice")
        if self.height < 32 or self.width < 32:
            raise ConfigError(f"SynthConfig.height/width: need at least 32 px, got {self.height}x{self.width}")
        knobs = {f"SynthConfig.{k}": getattr(self, k) for k in ("spread", "style_jitter", "speed_jitter",
                                                                 "view_jitter", "elevation_jitter")}
        knobs.update({f"NoiseConfig.{k}": v for k, v in vars(self.noise).items()})
        for name, v in [*knobs.items(), ("SynthConfig.elevation", abs(self.elevation))]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}: {v!r} is not allowed; expected a finite number >= 0")


#: A few-second preset for tests and smoke runs.
QUICK: Dict[str, Any] = dict(subjects=8, frames=12, views=(0, 54, 90, 126),
                             types=("nm-01", "nm-02", "nm-03", "nm-04", "nm-05", "nm-06", "bg-01", "cl-01"))


def _subject_rng(seed: int, subject: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 1, subject]))


def _sequence_seed(seed: int, subject: int, seq_type: str, view: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, 2, subject, CASIA_B_TYPES.index(seq_type), int(view)])


def _walk_view(cfg: SynthConfig, person, subject: int, seq_type: str, view: int):
    """One sequence's projected capsules, pixel scale, image centre and noise generator."""
    ss = _sequence_seed(cfg.seed, subject, seq_type, view)
    rng = np.random.default_rng(ss)
    gen = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1))
    person = wobble_subject(person, rng, cfg.style_jitter)
    walk = WalkSequence(speed=float(np.clip(1.0 + cfg.speed_jitter * rng.standard_normal(), 0.7, 1.3)),
                        phase0=float(rng.uniform(0, 2 * math.pi)),
                        bag=seq_type.startswith("bg"), coat=seq_type.startswith("cl"))
    p0, p1, r = walk_capsules(person, walk, cfg.frames)
    view_deg = view + cfg.view_jitter * float(np.clip(rng.standard_normal(), -2, 2))
    elev = cfg.elevation + cfg.elevation_jitter * float(rng.standard_normal())
    a, b = project(p0, view_deg, elev), project(p1, view_deg, elev)
    scale = cfg.height * 0.78 * float(rng.uniform(0.95, 1.05))
    # the body's bounding box drawn at the image centre, plus a little position jitter
    centre = torch.stack((0.5 * (a[:, :, 0].amax(1) + a[:, :, 0].amin(1)) + float(rng.normal(0, 0.01)),
                          0.5 * (a[:, :, 1].amax(1) + a[:, :, 1].amin(1)) + float(rng.normal(0, 0.01))), 1)
    return a, b, r, scale, centre, gen


def render_sequences(cfg: SynthConfig, subject: int, seq_type: str,
                     views: Sequence[int]) -> List[np.ndarray]:
    """Render, noise and pretreat one walk per view; uint8 ``[T, 64, 64]`` each (T may be < frames).

    Views are batched for speed; each sequence's bytes are the same as when rendered alone.
    """
    person = sample_subject(_subject_rng(cfg.seed, subject), cfg.spread)
    walks = [_walk_view(cfg, person, subject, seq_type, int(v)) for v in views]
    F = cfg.frames
    a = torch.cat([w[0] for w in walks])
    b = torch.cat([w[1] for w in walks])
    scale = torch.cat([torch.full((F,), w[3], dtype=torch.float64) for w in walks])
    centre = torch.cat([w[4] for w in walks])
    mask = rasterize(a, b, walks[0][2], cfg.height, cfg.width, scale, centre)

    # lowest foreground row and its mean column, where a shadow would touch the body
    rows = mask[:, 0].sum(2) > 0
    btm = cfg.height - 1 - rows.flip(1).to(torch.int64).argmax(1)
    btm_row = mask[torch.arange(mask.shape[0]), 0, btm]
    cols = torch.arange(cfg.width, dtype=torch.float32)
    foot_col = (btm_row * cols).sum(1) / btm_row.sum(1).clamp_min(1)
    feet = torch.stack((btm.to(torch.float32), foot_col), 1)
    noisy = torch.cat([add_noise(mask[k * F:(k + 1) * F], w[5], cfg.noise, feet[k * F:(k + 1) * F])
                       for k, w in enumerate(walks)])
    kept, keep = pretreat_batch(noisy[:, 0] * 255.0)
    counts = keep.reshape(len(walks), F).sum(1)
    return list(np.split(kept, np.cumsum(counts)[:-1]))


def render_sequence(cfg: SynthConfig, subject: int, seq_type: str, view: int) -> np.ndarray:
    """Render, noise and pretreat one sequence; uint8 ``[T, 64, 64]`` (T may be < frames)."""
    return render_sequences(cfg, subject, seq_type, [view])[0]


def default_split(n_subjects: int, train_fraction: float = 74 / 124, val_subjects: int = 0,
                  train_subjects: Optional[int] = None) -> Tuple[List[str], List[str], List[str]]:
    """``(train, val, test)`` id lists: ids in order, training ids first, then validation, then test.

    Without ``train_subjects`` the training share follows CASIA-B's large-training (LT) split
    (74 of 124 subjects) applied to the ids left after the validation ones. Validation ids are
    disjoint from both: they exist for model selection and tuning, so that the test ids are read
    once per reported result.
    """
    if val_subjects < 0:
        raise ConfigError(f"val_subjects: {val_subjects} must be >= 0")
    rest = n_subjects - val_subjects
    if rest < 2:
        raise ConfigError(f"default_split: {n_subjects} subjects leave {rest} after {val_subjects} validation "
                          "subjects; need at least one to train and one to test")
    if train_subjects is None:
        n_train = min(max(int(round(rest * train_fraction)), 1), rest - 1)
    elif not 1 <= train_subjects <= rest - 1:
        raise ConfigError(f"train_subjects: {train_subjects} must be in 1..{rest - 1} ({n_subjects} subjects, "
                          f"{val_subjects} for validation, at least one to test)")
    else:
        n_train = train_subjects
    ids = [subject_id(i + 1) for i in range(n_subjects)]
    return ids[:n_train], ids[n_train:n_train + val_subjects], ids[n_train + val_subjects:]


def _subject_job(args: Tuple[SynthConfig, str, int]) -> int:
    """Write every sequence of one subject; returns the number of sequences written."""
    cfg, out_dir, subject = args
    n = 0
    for seq_type in cfg.types:
        for view, frames in zip(cfg.views, render_sequences(cfg, subject, seq_type, cfg.views)):
            if frames.shape[0] == 0:
                continue
            write_sequence(out_dir, subject_id(subject), seq_type, view_name(view), frames)
            n += 1
    return n


def _init_worker() -> None:
    torch.set_num_threads(1)


def generate_dataset(out_dir: os.PathLike, subjects: int = 50, seed: int = 0, frames: int = 30,
                     views: Optional[Iterable[int]] = None, types: Optional[Iterable[str]] = None,
                     workers: int = 1, progress: bool = True, train_fraction: float = 74 / 124,
                     val_subjects: int = 0, train_subjects: Optional[int] = None, **knobs: Any) -> Path:
    """Generate the data set into ``out_dir`` and return the path of its partition JSON.

    ``knobs`` are further :class:`SynthConfig` fields (``spread``, ``style_jitter``, ``noise``,
    ...); ``noise`` may be a :class:`NoiseConfig`, a dict of its fields, or a number (its scale).
    ``workers`` > 1 renders subjects in that many processes; the bytes do not depend on it.
    ``val_subjects`` > 0 adds a ``VAL_SET`` of that many subjects to the partition, disjoint from
    ``TRAIN_SET`` and ``TEST_SET`` (OpenGait reads only the latter two and ignores it); see
    :func:`default_split`.
    """
    train, val, test = default_split(subjects, train_fraction, val_subjects, train_subjects)  # checked first
    noise = knobs.pop("noise", None)
    if isinstance(noise, (int, float)):
        noise = NoiseConfig(scale=float(noise))
    elif isinstance(noise, dict):
        noise = NoiseConfig(**noise)
    if noise is not None:
        knobs["noise"] = noise
    cfg = SynthConfig(subjects=subjects, seed=seed, frames=frames,
                      views=tuple(int(v) for v in (views if views is not None else CASIA_B_VIEWS)),
                      types=tuple(types if types is not None else CASIA_B_TYPES), **knobs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, str(out), s) for s in range(1, cfg.subjects + 1)]
    bar = tqdm(total=len(jobs), desc="synth", unit="subject", disable=not progress)
    if workers <= 1:
        # one thread: the tensors are small, and torch's thread pool only spins on a busy machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs:
                _subject_job(job)
                bar.update(1)
        finally:
            torch.set_num_threads(threads)
    else:
        # fork (as torch's DataLoader does) starts fast and needs no __main__ guard in callers
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers, initializer=_init_worker) as pool:
            for _ in pool.imap_unordered(_subject_job, jobs):
                bar.update(1)
    bar.close()
    return write_partition(out / PARTITION_NAME, train, test, extra={"VAL_SET": val} if val else None)
