"""Checkpoint files: the one reader, the one writer, and loading FP weights into a quantized model.

Every checkpoint the package reads goes through :func:`read_checkpoint`: an FP checkpoint for
``quant.init_from`` (built-in trainer, OpenGait model, teacher), the built-in trainer's resume
files and packed models. It unpickles with ``weights_only=True``, so a file can hold tensors and
plain containers (dicts, lists, tuples, numbers, strings) but nothing whose unpickling would run
code; anything else is a :class:`CheckpointError` naming the file and why.

A checkpoint may be a bare state dict, OpenGait's ``{'model': ..., 'optimizer': ..., ...}`` or a
DDP-saved state dict (``module.`` prefixes); :func:`unwrap_state_dict` finds the model's state
dict in any of them.

``torch.save`` writes a zip archive whose members (the pickle, one per tensor storage) each carry a
CRC-32 that ``torch.load`` never checks: a flipped bit inside a weight loads as a slightly different
model and evaluates to a different score with no warning. :func:`read_checkpoint` checks every
member's CRC first (:func:`verify_zip`, one extra read of the file) and refuses a damaged file,
naming the damaged member.
"""
from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .atomic import write_atomic
from .compat import load_weights_only
from .errors import ConfigError, DamagedFile, QGaitError
from .quant.convert import iter_quantizers
from .quant.placement import ATTR as PLACEMENT_ATTR


class CheckpointError(QGaitError):
    """A file that cannot be read as a checkpoint: missing, not a checkpoint, or holding objects that are not
    plain data."""


class DamagedCheckpoint(CheckpointError, DamagedFile):
    """A checkpoint whose zip members fail their CRC check (the file changed after it was written)."""


def verify_zip(path: str, where: str) -> None:
    """Check the CRC of every member of the zip archive at ``path`` (what ``torch.save`` writes).

    A file that is not a zip archive at all is left to the loader (torch's legacy format, or not a
    checkpoint); ``where`` starts the message of the :class:`DamagedCheckpoint` raised for a member
    whose bytes no longer match its CRC, or an archive whose index does not read.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as e:
        detail = " ".join(str(e).split())[:200]
        raise DamagedCheckpoint(f"{where} is damaged: its archive does not read ({type(e).__name__}: {detail}); "
                                "restore it from a copy or write it again") from None
    if bad is not None:
        what = "the pickled structure" if bad.endswith(".pkl") else "a tensor's data"
        raise DamagedCheckpoint(f"{where} is damaged: member {bad!r} ({what}) fails its CRC check, so its bytes "
                                "changed after it was written; refused. Restore it from a copy or write it again")


def _first_line_with(text: str, marker: str) -> Optional[str]:
    """The first line of ``text`` holding ``marker`` (any case), stripped."""
    for line in text.splitlines():
        if marker.lower() in line.lower():
            return line.strip()
    return None


def read_checkpoint(path: str | os.PathLike[str], source: Optional[str] = None) -> Dict[str, Any]:
    """The dict stored in the checkpoint at ``path``, loaded onto the CPU.

    ``source`` (e.g. ``"quant.init_from"``) starts the error message, so the user learns which
    setting named the file. Raises :class:`CheckpointError` for a missing file, a file that is
    not a PyTorch checkpoint, a damaged one (:func:`verify_zip`), one that holds something other than a
    dict, and one whose pickle
    names a class or function outside torch's allowlist (loading it could run that code; it is
    refused, never executed).
    """
    p = os.fspath(path)
    where = f"{source}: {p!r}" if source else repr(p)
    if not os.path.exists(p):
        raise CheckpointError(f"{where} does not exist")
    if os.path.isdir(p):
        raise CheckpointError(f"{where} is a folder; expected a checkpoint file (.pt)")
    verify_zip(p, where)
    try:
        obj = load_weights_only(p)
    except pickle.UnpicklingError as e:
        # torch words it "Unsupported global: GLOBAL x.y" for modules it knows, "unsupported GLOBAL posix.system
        # whose module posix is blocked" for os/subprocess/builtins and the like
        unsafe = _first_line_with(str(e), "unsupported global")
        if unsafe is not None:
            raise CheckpointError(f"{where} holds objects that are not tensors or plain data ({unsafe}); refused, "
                                  "since loading them could run code. Re-save the checkpoint with state dicts only"
                                  ) from None
        raise CheckpointError(f"{where} is not a PyTorch checkpoint (unpickling failed)") from None
    except Exception as e:
        # on a file that is not a checkpoint torch.load fails with almost any type: RuntimeError for a
        # broken zip, EOFError, IndexError for a text file, UnicodeDecodeError, ...
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{where} is not a PyTorch checkpoint ({type(e).__name__}: {detail})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}; expected a state dict or a checkpoint dict")
    return dict(obj)


def write_checkpoint(obj: Mapping[str, Any], path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (a reader sees the old file or the whole new one).

    ``obj`` should hold only what :func:`read_checkpoint` reads back: tensors and plain data. The
    archive is written through a Python file, so a full disk arrives as ``OSError(ENOSPC)`` (torch's
    own file writer words it as an unrelated RuntimeError) and :func:`write_atomic` reports it as one
    line while the earlier checkpoints stay as they were.
    """

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomic(path, save)


def unwrap_state_dict(obj: Mapping[str, Any], model_keys: set[str]) -> Dict[str, Any]:
    """The model's state dict out of an OpenGait-style checkpoint (``{'model': ..., 'optimizer': ...}``)
    or a DDP-saved one (``module.`` prefixes); a plain state dict comes back as it is.

    ``model_keys`` are the keys of the model it is meant for (a model with a parameter called
    ``model`` or ``module.*`` keeps them)."""
    sd = obj
    if "model" in sd and isinstance(sd["model"], Mapping) and "model" not in model_keys:
        sd = sd["model"]
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd) and not any(k.startswith("module.") for k in model_keys):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_float_state_dict(model: nn.Module, state_dict: Mapping[str, Any],
                          source: str = "the state dict") -> Dict[str, torch.Tensor]:
    """Load full-precision weights into a (converted) model; returns the state dict it loaded.

    ``state_dict`` may be any form :func:`unwrap_state_dict` reads. Only the quantizers' own keys
    may be missing (their steps initialise from data); any other missing key, an unexpected key
    or a shape mismatch is a :class:`ConfigError` that starts with ``source`` (e.g.
    ``"quant.init_from: fp.pt"``), since QAT from half-loaded weights trains noise. So is a QAT
    checkpoint (it holds quantizer state): the teacher built from it would not be full precision.
    """
    sd = unwrap_state_dict(state_dict, set(model.state_dict()))
    # the quantizers' own keys, and the dataflow placement's plan (its extra state)
    quant_prefixes = tuple(f"{name}." for name, _ in iter_quantizers(model)) + (f"{PLACEMENT_ATTR}.",)
    quantized = [k for k in sd if quant_prefixes and k.startswith(quant_prefixes)]
    if quantized:
        # it would load (same config), but the student would not start from FP weights and the IDD/KD
        # teacher built from it would be a quantized model
        raise ConfigError(f"{source} holds quantizer state ({len(quantized)} entries, e.g. {quantized[0]!r}): it is a "
                          "QAT checkpoint, not a full-precision one. Give the FP checkpoint the QAT run started from")
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConfigError(f"{source} does not fit {type(model).__name__}: {e}") from None
    except ConfigError as e:  # a quantizer of another bit width (a QAT checkpoint of another config)
        raise ConfigError(f"{source} does not fit {type(model).__name__}: {e}") from None
    missing = [k for k in res.missing_keys if not k.startswith(quant_prefixes)]
    if missing or res.unexpected_keys:
        raise ConfigError(f"{source} does not match {type(model).__name__}: missing {missing[:5]}, unexpected "
                          f"{list(res.unexpected_keys)[:5]}; expected a full-precision checkpoint of the same model")
    return sd
