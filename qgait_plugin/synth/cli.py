"""``qgait synth``: write a generated CASIA-B-shaped silhouette set in OpenGait's format.

Renders articulated walkers from 11 views (nm/bg/cl types) to DIR/<id>/<type>/<view>/<view>.pkl
(uint8 [frames, 64, 64]) plus DIR/partition.json. Same seed, same bytes. A run that fails (a full
disk, Ctrl-C) removes what it wrote.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _str_list(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (the data set root)")
    p.add_argument("--subjects", type=int, default=None, help="number of subjects (default 50; --quick: 8)")
    p.add_argument("--val-subjects", type=int, default=0,
                   help="subjects for a VAL_SET (model selection/tuning), disjoint from train and test (default 0)")
    p.add_argument("--train-subjects", type=int, default=None,
                   help="training subjects (default: CASIA-B's 74/124 share of the non-validation ids)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--frames", type=int, default=None, help="frames per sequence (default 30; --quick: 12)")
    p.add_argument("--views", type=_int_list, default=None,
                   help="comma-separated view angles, subset of 0,18,...,180 (default all 11)")
    p.add_argument("--types", type=_str_list, default=None,
                   help="comma-separated types, subset of nm-01..06,bg-01,bg-02,cl-01,cl-02 (default all)")
    p.add_argument("--quick", action="store_true", help="tiny preset for smoke tests (a few seconds)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2); output does not depend on it")
    p.add_argument("--noise", type=float, default=None, help="segmentation-noise scale (default 1, 0 = clean)")
    p.add_argument("--spread", type=float, default=None,
                   help="between-subject variation scale (default 1; lower = harder)")
    p.add_argument("--style-jitter", type=float, default=None,
                   help="per-sequence style wobble in population sds (default 0.35; higher = harder)")
    p.add_argument("--speed-jitter", type=float, default=None, help="sd of per-sequence walking speed (default 0.07)")
    p.add_argument("--view-jitter", type=float, default=None, help="view angle jitter in degrees (default 3)")
    p.add_argument("--probe", action="store_true",
                   help="afterwards, print the rank-1 of a small GEI network (a rough difficulty check)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a data set already in --out (its partition and subject folders are removed first)")


def check_out_dir(out: str, overwrite: bool, new_ids: List[str]) -> List[str]:
    """What of ``out`` a new data set would replace: refuse unless ``overwrite``; returns the folders to remove.

    ``out`` must be a folder (or not exist). A folder holding anything is refused without
    ``overwrite``, naming what is there; with it, the subject folders of the old partition and those
    the new set writes are removed (stale views of another setting would otherwise mix in), and
    nothing else.
    """
    from ..errors import ConfigError, OutputExists, short_repr
    from ..layout import PARTITION_NAME, DataError, read_partition

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder for the data set")
    entries = sorted(e.name for e in root.iterdir()) if root.is_dir() else []
    if not entries:
        return []
    if not overwrite:
        what = "a data set (partition.json)" if PARTITION_NAME in entries else f"{len(entries)} entries"
        raise OutputExists(f"--out {out}: already holds {what}: {short_repr(entries)}; pass --overwrite to replace "
                           "the data set, or choose an empty folder")
    ids = set(new_ids)
    if (root / PARTITION_NAME).is_file():
        try:
            part = read_partition(root / PARTITION_NAME)
            ids |= {x for k, v in part.items() if isinstance(v, list) for x in v}
        except DataError:
            pass
    real = root.resolve()
    return [str(root / i) for i in sorted(ids)
            if i and (root / i).is_dir() and not (root / i).is_symlink() and (root / i).resolve().parent == real]


def _remove_partial(root: Path, ids: List[str], created: bool) -> None:
    """After a failed generation (a full disk, Ctrl-C): remove the subject folders and partition this
    run wrote, and ``root`` itself when the run created it, so no half data set passes for a whole one."""
    import shutil

    from ..layout import PARTITION_NAME

    if not root.is_dir():
        return
    for i in ids:
        d = root / i
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
    part = root / PARTITION_NAME
    if part.is_file():
        part.unlink()
    if created:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """Generate the set; prints where the partition file went."""
    import math
    import shutil

    from ..errors import ConfigError
    from ..layout import subject_id
    from .generate import QUICK, SynthConfig, generate_dataset

    base: Dict[str, Any] = dict(QUICK) if args.quick else {}
    kw: Dict[str, Any] = dict(
        subjects=args.subjects if args.subjects is not None else base.get("subjects", SynthConfig.subjects),
        frames=args.frames if args.frames is not None else base.get("frames", SynthConfig.frames),
        views=args.views or base.get("views"), types=args.types or base.get("types"))
    if kw["subjects"] < 2:
        raise ConfigError(f"--subjects: {kw['subjects']}; need at least 2 (one to train, one to test)")
    if kw["frames"] < 1:
        raise ConfigError(f"--frames: {kw['frames']}; need at least 1")
    if args.workers < 1:
        raise ConfigError(f"--workers: {args.workers}; need at least 1")
    for name in ("noise", "spread", "style_jitter", "speed_jitter", "view_jitter"):
        value = getattr(args, name)
        if value is not None:
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: {value}; expected a finite number >= 0")
            kw[name] = value
    from ..atomic import check_writable

    new_ids = [subject_id(i + 1) for i in range(kw["subjects"])]
    stale = check_out_dir(args.out, args.overwrite, new_ids)
    check_writable(args.out, "--out")
    for d in stale:
        shutil.rmtree(d)
    t0 = time.time()
    created = not Path(args.out).exists()
    try:
        partition = generate_dataset(args.out, seed=args.seed, workers=args.workers, val_subjects=args.val_subjects,
                                     train_subjects=args.train_subjects, **kw)
    except BaseException:
        _remove_partial(Path(args.out), new_ids, created)
        raise
    print(f"wrote {args.out} ({kw['subjects']} subjects) in {time.time() - t0:.1f} s; partition: {partition}")
    if args.probe:
        from .difficulty import probe

        res = probe(args.out, partition)
        print("GEI probe rank-1 (%): " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    return 0
