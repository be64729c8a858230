"""Checkpoints in OpenGait's layout, written atomically.

``<output>/checkpoints/<save_name>-<iter:05d>.pt`` holds ``model``, ``optimizer``, ``scheduler``,
``iteration`` (+ ``schedule`` for QAT runs and the sampler's RNG). Files are written to a temporary
name in the same folder and moved into place with ``os.replace``, so a crash never leaves a
half-written checkpoint where a resume would find it.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import torch

from ..atomic import write_atomic


def checkpoint_path(out_dir: str, save_name: str, iteration: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"{save_name}-{iteration:05d}.pt")


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file beside ``path``, then ``os.replace`` it into place."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint dict; a raw state dict is returned as ``{"model": state_dict}``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        return dict(obj)
    if isinstance(obj, Mapping):
        return {"model": obj}
    raise ValueError(f"{path}: expected a state dict or a checkpoint dict with a 'model' key, got {type(obj).__name__}")
