"""The silhouette generator: OpenGait's layout, determinism, and identity that survives a type change."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from qgait_plugin.errors import ConfigError
from qgait_plugin.layout import CASIA_B_TYPES, CASIA_B_VIEWS
from qgait_plugin.synth import QUICK, generate_dataset, pretreat
from qgait_plugin.synth.render import rasterize

SMALL = dict(subjects=3, frames=6, views=(0, 90), types=("nm-01", "bg-01", "cl-01"), progress=False)


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quick_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_quick")
    partition = generate_dataset(root, seed=0, progress=False, **QUICK)
    return root, partition


def test_layout_matches_opengait_conventions(quick_set):
    root, partition = quick_set
    part = json.loads(Path(partition).read_text())
    assert set(part) == {"TRAIN_SET", "TEST_SET"}
    ids = sorted(d.name for d in root.iterdir() if d.is_dir())
    assert sorted(part["TRAIN_SET"] + part["TEST_SET"]) == ids
    assert not set(part["TRAIN_SET"]) & set(part["TEST_SET"])
    assert len(ids) == QUICK["subjects"] and ids[0] == "001"
    # walk it the way OpenGait's DataSet does: id / type / view / *.pkl, each pickle-loaded
    for sid in ids:
        assert sorted(os.listdir(root / sid)) == sorted(QUICK["types"])
        for typ in os.listdir(root / sid):
            assert sorted(os.listdir(root / sid / typ)) == [f"{v:03d}" for v in QUICK["views"]]
            for view in os.listdir(root / sid / typ):
                files = sorted(os.listdir(root / sid / typ / view))
                assert files == [f"{view}.pkl"]
                with open(root / sid / typ / view / files[0], "rb") as f:
                    arr = pickle.load(f)
                assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
                assert arr.ndim == 3 and arr.shape[1:] == (64, 64) and 1 <= arr.shape[0] <= QUICK["frames"]
                # silhouettes: spanning the full height after the crop, centred, with gray edges
                assert arr.max() == 255
                assert (arr.reshape(len(arr), 64, 64).max(2) > 0).any(1).all()
                assert arr[:, 0].max() > 0 and arr[:, -1].max() > 0


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _hashes(Path(generate_dataset(tmp_path / "a", seed=3, **SMALL)).parent)
    b = _hashes(Path(generate_dataset(tmp_path / "b", seed=3, **SMALL)).parent)
    c = _hashes(Path(generate_dataset(tmp_path / "c", seed=4, **SMALL)).parent)
    assert a == b
    pkl = [k for k in a if k.endswith(".pkl")]
    assert len(pkl) == 3 * 2 * 3
    assert all(a[k] != c[k] for k in pkl)


def _gei(path: Path, size=(16, 11)) -> np.ndarray:
    with open(path, "rb") as f:
        arr = pickle.load(f).astype(np.float32) / 255.0
    x = torch.from_numpy(arr[:, :, 10:54]).mean(0)[None, None]  # OpenGait-style 44-column cut
    return torch.nn.functional.interpolate(x, size=size, mode="area").flatten().numpy()


def test_subjects_differ_across_types(quick_set):
    """Nearest centroid on gait energy images: fit on nm-01..04, identify nm-05/06 and bg-01."""
    root, _ = quick_set
    ids = sorted(d.name for d in root.iterdir() if d.is_dir())
    views = [f"{v:03d}" for v in QUICK["views"]]
    correct = total = 0
    for view in views:
        cent = np.stack([np.mean([_gei(root / s / t / view / f"{view}.pkl")
                                  for t in ("nm-01", "nm-02", "nm-03", "nm-04")], 0) for s in ids])
        for k, s in enumerate(ids):
            for t in ("nm-05", "nm-06", "bg-01"):
                g = _gei(root / s / t / view / f"{view}.pkl")
                correct += int(np.argmin(((cent - g) ** 2).sum(1)) == k)
                total += 1
    chance = 1 / len(ids)
    assert correct / total > 3 * chance, f"accuracy {correct / total:.2f} vs chance {chance:.2f}"


def test_pretreat_crops_scales_and_centres():
    frames = np.zeros((3, 120, 90), np.float32)
    frames[0, 20:100, 10:30] = 255  # tall box at the left
    frames[1, 50:70, 60:80] = 255   # small square at the right: becomes 64 tall and wide
    frames[2, 0:3, 0:3] = 255       # almost empty: dropped as OpenGait drops it
    out = pretreat(frames)
    assert out.shape == (2, 64, 64) and out.dtype == np.uint8
    # box 80 x 20 -> 64 x 16, centred: columns 24..40 in the 64-wide window
    cols = np.nonzero(out[0].max(0) > 127)[0]
    assert cols.min() in (23, 24, 25) and cols.max() in (38, 39, 40)
    assert out[0][:, 32].min() > 127  # full height after the vertical crop
    assert (out[1] > 127).mean() > 0.9


def test_rasterize_matches_distance_test():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(4, 6, 2, generator=gen, dtype=torch.float64) - 0.5
    b = a + 0.3 * torch.randn(4, 6, 2, generator=gen, dtype=torch.float64)
    b[:, 0] = a[:, 0]  # a sphere
    r = 0.02 + 0.05 * torch.rand(6, generator=gen, dtype=torch.float64)
    H, W, scale = 40, 36, 30.0
    mask = rasterize(a, b, r, H, W, scale, torch.zeros(4, 2, dtype=torch.float64))
    pu = (torch.arange(W, dtype=torch.float64) - (W - 1) / 2) / scale
    pv = ((H - 1) / 2 - torch.arange(H, dtype=torch.float64)) / scale
    p = torch.stack(torch.meshgrid(pu, pv, indexing="xy"), -1).reshape(1, 1, -1, 2)
    ab, ap = (b - a)[:, :, None], p - a[:, :, None]
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    d2 = ((ap - t[..., None] * ab) ** 2).sum(-1)
    ref = (d2 < r[None, :, None] ** 2).any(1).reshape(4, 1, H, W).float()
    assert ref.sum() > 50
    assert (mask != ref).sum() <= 2  # float32 spans vs float64 distances: at most a boundary pixel


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="xx-01"):
        generate_dataset(tmp_path, subjects=3, types=("xx-01",), progress=False)
    with pytest.raises(ValueError, match="200"):
        generate_dataset(tmp_path, subjects=3, views=(200,), progress=False)
    assert CASIA_B_VIEWS == tuple(range(0, 181, 18)) and len(CASIA_B_TYPES) == 10


def test_validation_split_is_disjoint(tmp_path):
    from qgait_plugin.layout import read_partition
    from qgait_plugin.synth.generate import default_split

    train, val, test = default_split(20, val_subjects=5, train_subjects=9)
    assert (len(train), len(val), len(test)) == (9, 5, 6)
    assert not (set(train) & set(val) or set(val) & set(test) or set(train) & set(test))
    assert default_split(10)[1] == []                       # no VAL_SET unless asked for
    part = generate_dataset(tmp_path, subjects=5, frames=2, views=(0,), types=("nm-01", "nm-05"), val_subjects=1,
                            train_subjects=2, progress=False)
    p = read_partition(part)
    assert (p["TRAIN_SET"], p["VAL_SET"], p["TEST_SET"]) == (["001", "002"], ["003"], ["004", "005"])
    with pytest.raises(ConfigError, match="train_subjects: 9 must be in 1..3"):
        default_split(5, val_subjects=1, train_subjects=9)
