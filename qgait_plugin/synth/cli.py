"""``qgait synth``: write a generated CASIA-B-shaped silhouette set in OpenGait's format.

Renders articulated walkers from 11 views (nm/bg/cl types) to DIR/<id>/<type>/<view>/<view>.pkl
(uint8 [frames, 64, 64]) plus DIR/partition.json. Same seed, same bytes.
"""
from __future__ import annotations

import argparse
import time
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


def run(args: argparse.Namespace) -> int:
    """Generate the set; prints where the partition file went."""
    from .generate import QUICK, SynthConfig, generate_dataset

    base: Dict[str, Any] = dict(QUICK) if args.quick else {}
    kw: Dict[str, Any] = dict(subjects=args.subjects or base.get("subjects", SynthConfig.subjects),
                              frames=args.frames or base.get("frames", SynthConfig.frames),
                              views=args.views or base.get("views"), types=args.types or base.get("types"))
    for name in ("noise", "spread", "style_jitter", "speed_jitter", "view_jitter"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    t0 = time.time()
    partition = generate_dataset(args.out, seed=args.seed, workers=args.workers, val_subjects=args.val_subjects,
                                 train_subjects=args.train_subjects, **kw)
    print(f"wrote {args.out} ({kw['subjects']} subjects) in {time.time() - t0:.1f} s; partition: {partition}")
    if args.probe:
        from .difficulty import probe

        res = probe(args.out, partition)
        print("GEI probe rank-1 (%): " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    return 0
