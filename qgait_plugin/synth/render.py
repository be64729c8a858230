"""Rendering: project body capsules to a view, rasterise them, add segmentation noise.

Rasterisation is a batched distance test (pixel grid against every projected capsule for every
frame at once), so there are no Python loops over pixels or frames. The noise imitates what
background subtraction does to real silhouettes (CASIA-B's are far from clean): ragged boundaries,
frames that are a little fat or thin, missing patches where clothing matched the background, and
shadow blobs at the feet. It uses kornia morphology and resizing, driven by a seeded
``torch.Generator`` so a sequence's pixels depend only on its seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import kornia
import torch


@dataclass(frozen=True)
class NoiseConfig:
    """Segmentation-noise knobs; ``scale`` multiplies every probability (0 = clean silhouettes)."""

    scale: float = 1.0
    morph_prob: float = 0.4   # chance a frame is eroded or dilated (3x3) as a whole
    flip_prob: float = 0.12   # chance each boundary pixel flips
    hole_prob: float = 0.3    # chance a frame loses a patch (clothing matched the background)
    hole_frac: float = 0.06   # area of that patch relative to the frame's low-res noise field
    shadow_prob: float = 0.3  # chance a sequence has a shadow blob at the feet


def project(p: torch.Tensor, view_deg: float, elevation_deg: float = 0.0) -> torch.Tensor:
    """Orthographic projection of body-frame points ``[..., 3]`` to image ``[..., 2]`` (u right, v up).

    View 0 faces the walker (walking towards the camera), 90 is the side view (walking to the
    right), 180 the back view, as in CASIA-B. ``elevation_deg`` tilts the camera to look down.
    """
    th, el = math.radians(view_deg), math.radians(elevation_deg)
    x, y, z = p.unbind(-1)
    u = x * math.sin(th) + y * math.cos(th)
    depth = x * math.cos(th) - y * math.sin(th)  # towards the camera
    v = z * math.cos(el) + depth * math.sin(el)
    return torch.stack((u, v), -1)


def _interval(alpha: torch.Tensor, beta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The u-interval where ``lo <= alpha * u + beta <= hi`` (empty means ``left > right``)."""
    flat = alpha.abs() < 1e-9
    safe = torch.where(flat, torch.ones_like(alpha), alpha)
    u1, u2 = (lo - beta) / safe, (hi - beta) / safe
    left, right = torch.minimum(u1, u2), torch.maximum(u1, u2)
    always = (beta >= lo) & (beta <= hi)
    inf = torch.full_like(alpha, math.inf)
    left = torch.where(flat, torch.where(always, -inf, inf), left)
    right = torch.where(flat, torch.where(always, inf, -inf), right)
    return left, right


def capsule_spans(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, height: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image row, the column interval each capsule covers.

    ``a``, ``b``: end points ``[T, K, 2]`` in pixel coordinates (x right, y down, pixel centres at
    integers); ``r``: radii ``[K]`` or ``[T, K]`` in pixels. A capsule is convex, so each row meets it in one
    interval: the hull of the row's intervals through its two end discs and its middle
    rectangle. Returns ``(left, right)`` shaped ``[T, K, height]``; ``left > right`` when empty.
    """
    y = torch.arange(height, dtype=a.dtype)[None, None, :]
    ax, ay = a[..., 0:1], a[..., 1:2]
    bx, by = b[..., 0:1], b[..., 1:2]
    rr = (r[..., None] if r.ndim == 2 else r[None, :, None]).to(a.dtype)
    inf = torch.tensor(math.inf, dtype=a.dtype)
    lefts, rights = [], []
    for cx, cy in ((ax, ay), (bx, by)):  # the two end discs
        h2 = rr * rr - (y - cy) ** 2
        half = h2.clamp_min(0).sqrt()
        ok = h2 >= 0
        lefts.append(torch.where(ok, cx - half, inf))
        rights.append(torch.where(ok, cx + half, -inf))
    dx, dy = bx - ax, by - ay
    length = (dx * dx + dy * dy).sqrt()
    ok = length > 1e-6
    L = torch.where(ok, length, torch.ones_like(length))
    # along the axis: 0 <= ((u - ax) dx + (y - ay) dy) / L^2 <= 1
    l1, r1 = _interval(dx / (L * L), ((y - ay) * dy - ax * dx) / (L * L), torch.zeros_like(rr), torch.ones_like(rr))
    # across the axis: -r <= ((u - ax)(-dy) + (y - ay) dx) / L <= r
    l2, r2 = _interval(-dy / L, ((y - ay) * dx + ax * dy) / L, -rr, rr)
    lr, rr_ = torch.maximum(l1, l2), torch.minimum(r1, r2)
    lefts.append(torch.where(ok & (lr <= rr_), lr, inf))
    rights.append(torch.where(ok & (lr <= rr_), rr_, -inf))
    return torch.stack(lefts).amin(0), torch.stack(rights).amax(0)


def rasterize(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, height: int, width: int,
              scale: Union[float, torch.Tensor], center: torch.Tensor) -> torch.Tensor:
    """Binary masks ``[T, 1, H, W]`` (float 0/1) of the union of 2D capsules.

    ``a``, ``b``: end points ``[T, K, 2]`` in body units (u right, v up); ``r``: radii ``[K]``;
    ``scale``: pixels per body unit (a number or ``[T]``); ``center``: ``[T, 2]`` body point drawn at the image centre.
    A pixel is inside when its centre is. Work is per row and capsule (spans), then a difference
    array and a cumulative sum fill the rows, so the cost is O(T*K*H + T*H*W), not O(T*K*H*W).
    """
    T = a.shape[0]
    c = center.to(torch.float64)[:, None, :]
    k = torch.as_tensor(scale, dtype=torch.float64).expand(T)[:, None]  # [T, 1]

    def to_px(p: torch.Tensor) -> torch.Tensor:
        q = (p.to(torch.float64) - c) * k[..., None]
        return torch.stack((q[..., 0] + (width - 1) / 2, (height - 1) / 2 - q[..., 1]), -1).float()

    # float32 is ample for pixel coordinates of a few hundred and halves the work
    left, right = capsule_spans(to_px(a), to_px(b), (r.to(torch.float64)[None, :] * k).float(), height)
    start = torch.ceil(left).clamp(0, width)
    stop = torch.floor(right).clamp(-1, width - 1) + 1  # exclusive
    valid = (start < stop).flatten()
    t_idx = torch.arange(T)[:, None, None].expand_as(left).flatten()[valid]
    y_idx = torch.arange(height)[None, None, :].expand_as(left).flatten()[valid]
    diff = torch.zeros(T, height, width + 1, dtype=torch.int32)
    one = torch.ones(int(valid.sum()), dtype=torch.int32)
    diff.index_put_((t_idx, y_idx, start.flatten()[valid].long()), one, accumulate=True)
    diff.index_put_((t_idx, y_idx, stop.flatten()[valid].long()), -one, accumulate=True)
    inside = diff.cumsum(2)[..., :width] > 0
    return inside.to(torch.float32)[:, None]


def add_noise(mask: torch.Tensor, gen: torch.Generator, cfg: NoiseConfig,
              feet_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Segmentation noise on binary masks ``[T, 1, H, W]``; returns binary masks of the same shape.

    ``feet_rows``: ``[T, 2]`` (row, column) of the lowest foot point per frame, for shadow blobs.
    """
    if cfg.scale <= 0:
        return mask
    T, _, H, W = mask.shape
    # 3x3 neighbour counts (exact small integers in float32): >0 is the dilation, ==9 the erosion
    count = kornia.filters.filter2d(mask, torch.ones(1, 3, 3), border_type="constant")
    dil = (count > 0.5).to(mask.dtype)
    ero = (count > 8.5).to(mask.dtype)
    out = mask

    # whole-frame fat/thin
    u = torch.rand(T, generator=gen)
    p = min(cfg.morph_prob * cfg.scale, 1.0)
    fat = (u < p / 2)[:, None, None, None]
    thin = ((u >= p / 2) & (u < p))[:, None, None, None]
    out = torch.where(fat, dil, torch.where(thin, ero, out))

    # ragged boundary: flip pixels in the band between erosion and dilation
    band = (dil - ero) > 0.5
    flips = torch.rand(mask.shape, generator=gen) < min(cfg.flip_prob * cfg.scale, 1.0)
    out = torch.where(band & flips, 1.0 - out, out)

    # missing patches: threshold a smooth random field, upsampled with kornia
    low = torch.rand(T, 1, 8, 6, generator=gen)
    field = kornia.geometry.transform.resize(low, (H, W), interpolation="bilinear",
                                             align_corners=False)
    cut = torch.quantile(low.reshape(T, -1), 1.0 - cfg.hole_frac, dim=1)[:, None, None, None]
    has_hole = (torch.rand(T, generator=gen) < min(cfg.hole_prob * cfg.scale, 1.0))[:, None, None, None]
    out = torch.where(has_hole & (field > cut), torch.zeros_like(out), out)

    # shadow blob at the feet for the whole sequence
    if feet_rows is not None and float(torch.rand(1, generator=gen)) < min(cfg.shadow_prob * cfg.scale, 1.0):
        length = 8.0 + 16.0 * float(torch.rand(1, generator=gen))
        side = 1.0 if float(torch.rand(1, generator=gen)) < 0.5 else -1.0
        ys = torch.arange(H, dtype=torch.float32)[None, :, None]
        xs = torch.arange(W, dtype=torch.float32)[None, None, :]
        row = feet_rows[:, 0, None, None]
        col = feet_rows[:, 1, None, None] + side * length * 0.5
        blob = (((xs - col) / length) ** 2 + ((ys - row) / 2.5) ** 2) < 1.0
        out = torch.where(blob[:, None], torch.ones_like(out), out)

    return (out > 0.5).to(mask.dtype)
