"""OpenGait-style pretreatment of silhouette frames, batched with kornia.

OpenGait's ``datasets/pretreatment.py`` turns each raw silhouette image into a 64 x 64 uint8 frame:
drop frames with almost no foreground, crop rows to the silhouette's vertical extent, resize to
height 64 keeping the aspect ratio (cubic interpolation, so edges become gray), take as horizontal
centre the first column where the cumulative column mass exceeds half the total, and cut a 64-wide
window around it, zero-padded. This module reproduces those steps for a whole sequence at once:
one ``kornia.geometry.transform.remap`` call with each frame's crop-and-scale map, then
integer column sums and a gather, so the centring decision is exact integer arithmetic (and
therefore deterministic) on the quantised frame, as in OpenGait.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch
from kornia.geometry.transform import remap

#: OpenGait drops a raw frame whose pixel sum (0/255 image) is at most this.
MIN_FRAME_SUM = 10000


def pretreat_batch(frames: Union[torch.Tensor, np.ndarray], size: int = 64,
                   min_sum: float = MIN_FRAME_SUM) -> Tuple[np.ndarray, np.ndarray]:
    """Pretreat raw silhouettes ``[T, H, W]`` (0..255); returns ``(kept uint8 [T', size, size], keep [T] bool)``.

    Every frame is treated on its own (the result of a frame does not depend on the others in the
    batch), so many sequences can be batched together and split afterwards with ``keep``.
    """
    x = torch.as_tensor(frames).to(torch.float32)
    if x.ndim != 3:
        raise ValueError(f"pretreat: expected frames shaped [T, H, W], got {tuple(x.shape)}")
    T0, H, W = x.shape
    keep = x.sum((1, 2)) > min_sum
    x = x[keep]
    if x.shape[0] == 0:
        return np.zeros((0, size, size), np.uint8), keep.numpy()
    T = x.shape[0]
    rows = x.sum(2) > 0
    top = rows.to(torch.int64).argmax(1)
    btm = H - 1 - rows.flip(1).to(torch.int64).argmax(1)
    h = (btm - top + 1).to(torch.float64)
    new_w = torch.floor(size * (W / h)).to(torch.int64)  # int(img_size * ratio)
    half = size // 2
    width_max = int(new_w.max())

    # inverse map of "crop rows top..btm, resize to (new_w, size)", pixel centres at integers,
    # computed per pixel so a frame's values do not depend on the others in the batch
    sx = (new_w.to(torch.float64) / W)[:, None, None]
    sy = (size / h)[:, None, None]
    j = torch.arange(width_max, dtype=torch.float64)[None, None, :]
    i = torch.arange(size, dtype=torch.float64)[None, :, None]
    map_x = ((j + 0.5) / sx - 0.5).expand(T, size, width_max)
    map_y = ((i + 0.5) / sy - 0.5 + top.to(torch.float64)[:, None, None]).expand(T, size, width_max)
    out = remap(x[:, None], map_x.to(torch.float32), map_y.to(torch.float32), mode="bicubic",
                padding_mode="zeros", align_corners=True)[:, 0]
    inside = torch.arange(width_max)[None, :] < new_w[:, None]  # the resized image is new_w wide
    out = torch.where(inside[:, None, :], out, torch.zeros_like(out))
    out = torch.nn.functional.pad(out, (half, half))  # OpenGait's zero padding for the window
    img = out.round().clamp(0, 255).to(torch.int64)

    csum = img.sum(1).cumsum(1)
    total = csum[:, -1:]
    centre = (2 * csum > total).to(torch.int64).argmax(1)  # canvas column of the x-centre
    has_centre = (centre - half) > 0  # OpenGait skips a frame whose centre is column 0
    idx = (centre - half)[:, None] + torch.arange(size)[None, :]
    win = img.gather(2, idx[:, None, :].expand(T, size, size))
    keep[keep.clone()] = has_centre
    return win[has_centre].to(torch.uint8).numpy(), keep.numpy()


def pretreat(frames: Union[torch.Tensor, np.ndarray], size: int = 64,
             min_sum: float = MIN_FRAME_SUM) -> np.ndarray:
    """Crop, resize and centre raw silhouettes ``[T, H, W]`` (0..255) into uint8 ``[T', size, size]``.

    Frames with too little foreground (sum <= ``min_sum``) or no centre are dropped, as OpenGait
    does, so ``T' <= T``; an empty ``[0, size, size]`` array means nothing usable was left.
    """
    return pretreat_batch(frames, size, min_sum)[0]
