"""Single-process trainer and evaluator of the built-in host.

One object owns a run: the model (quantized when the config has ``quant:``), the optimizer and LR
scheduler, the P x K sampler, the optional FP teacher for IDD and the two-phase schedule. It
trains for ``trainer_cfg.total_iter`` iterations with a tqdm bar (loss, lr), saves atomic
checkpoints every ``save_iter`` iterations and at the end, resumes from them, and evaluates with
the CASIA-B protocol. CPU by default, CUDA when present (``trainer_cfg.device``).
"""
from __future__ import annotations

import glob
import math
import os
import random
import re
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import torch

from ..checkpoint import load_float_state_dict, read_checkpoint, unwrap_state_dict, write_checkpoint
from ..config import ConfigError
from ..errors import InputNotFound, NonFiniteError, OutputError, OutputExists, short_repr
from ..protocol import casia_b_protocol
from ..quant.quantizer import collapsed_steps
from .config import loss_terms, output_dir
from .data import TripletSampler, collate_fixed, load_split
from .evaluate import extract_embeddings
from .losses import build_losses
from .model import build_model

if TYPE_CHECKING:
    from ..distill import EmbeddingKDLoss, IDDLoss
    from ..schedule import QGaitSchedule
    from ..teacher import FrozenTeacher


def pick_device(name: str) -> torch.device:
    """``trainer_cfg.device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer_cfg.device: {short_repr(name)} is not a device; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ConfigError(f"trainer_cfg.device: {short_repr(name)}, but this machine has {count} CUDA device(s); "
                              "use auto or cpu")
    return dev


def _first_non_finite(tensors: Dict[str, Any]) -> List[str]:
    """Names of the floating tensors in ``tensors`` holding NaN or infinity."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def checkpoint_path(out_dir: str, save_name: str, iteration: int) -> str:
    """OpenGait's layout: ``<output>/checkpoints/<save_name>-<iter:05d>.pt``."""
    return os.path.join(out_dir, "checkpoints", f"{save_name}-{iteration:05d}.pt")


def load_fp_weights(model: torch.nn.Module, path: str, announce: bool = True) -> Dict[str, torch.Tensor]:
    """Load an FP checkpoint into a (quantized) model; only quantizer keys may be missing.

    Returns the FP state dict (the teacher is built from it). Says which file it read (``announce``).
    """
    if announce:
        print(f"quant.init_from: reading FP weights from {path}", flush=True)
    return load_float_state_dict(model, read_checkpoint(path, "quant.init_from"), source=f"quant.init_from: {path}")


def checkpoint_files(ck_dir: str, save_name: str) -> List[str]:
    """This run's checkpoints in ``ck_dir`` (``<save_name>-<iteration>.pt``), oldest iteration first."""
    found = []
    for f in glob.glob(os.path.join(glob.escape(ck_dir), f"{glob.escape(save_name)}-*.pt")):
        m = re.fullmatch(re.escape(save_name) + r"-(\d+)\.pt", os.path.basename(f))
        if m:
            found.append((int(m.group(1)), f))
    return [f for _, f in sorted(found)]


def example_batch(cfg: Dict[str, Any]) -> torch.Tensor:
    """One batch ``[1, frames, h, w]`` of binary silhouettes of the configured shape, for the trace
    that places the quantizers (drawn from its own generator: the run's random state is untouched)."""
    h, w = cfg["data_cfg"]["resolution"]
    frames = int(cfg["trainer_cfg"]["sampler"].get("frames_num_fixed") or 30)
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, frames, int(h), int(w), generator=g) > 0.5).float()


class Trainer:
    """Build everything a run needs from a checked config (see :mod:`qgait_plugin.local.config`)."""

    def __init__(self, cfg: Dict[str, Any], progress: bool = True, announce: bool = True):
        self.cfg = cfg
        self.progress = progress
        #: print which checkpoint files are read and removed (a caller that records them itself turns it off)
        self.announce = announce
        t = cfg["trainer_cfg"]
        if t.get("num_threads"):
            torch.set_num_threads(int(t["num_threads"]))
        self.device = pick_device(t.get("device", "auto"))
        seed = int(t.get("seed", 0))
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.rng = random.Random(seed + 1)
        self.out_dir = output_dir(cfg)
        self.save_name = t["save_name"]
        self.quant = cfg.get("quant")
        self.model = build_model(cfg["model_cfg"])
        self.fp_state: Optional[Dict[str, torch.Tensor]] = None
        if self.quant is not None:
            from ..quant.convert import quantize_for
            from .model import register_quant_handlers

            register_quant_handlers()
            # quantizers placed from the model's dataflow on an example batch; a checkpoint placed
            # otherwise (trained before dataflow placement) re-converts the model when it is restored
            quantize_for(self.model, self.quant, example_inputs=example_batch(cfg))
        self.model.to(self.device)
        self.iteration = 0
        #: whether the last restore re-converted the model to the checkpoint's placement
        self._requantized = False
        #: the checkpoint file the model was last loaded from (None: not loaded from one)
        self.checkpoint: Optional[str] = None
        #: the last checkpoint this run wrote
        self.last_saved: Optional[str] = None
        self.history: List[Dict[str, float]] = []
        self.train_seconds = 0.0
        self._train_seqs = None
        # made by _setup_training (the first train())
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.schedule: Optional[QGaitSchedule] = None
        self.teacher: Optional[FrozenTeacher] = None
        self.idd: Optional[IDDLoss] = None
        self.kd: Optional[EmbeddingKDLoss] = None
        #: validation results recorded during training (``trainer_cfg.val_iter``)
        self.val_history: List[Dict[str, Any]] = []
        #: the full result of the latest validation (``iteration`` added), for a caller that would
        #: otherwise evaluate the same weights on VAL_SET again
        self.last_validation: Optional[Dict[str, Any]] = None

    # -- training setup ---------------------------------------------------------------------
    def _setup_training(self) -> None:
        cfg, t = self.cfg, self.cfg["trainer_cfg"]
        self.losses = build_losses(loss_terms(cfg))
        self.teacher = None
        self.idd = None
        self.kd = None
        self.schedule = None
        if t["restore_hint"] in (0, None):
            self._check_fresh_run(bool(t.get("overwrite", False)))
        if self.quant is not None and t["restore_hint"] not in (0, None):
            # before the teacher and the optimizer are built over the quantizers' parameters
            path = self.resolve(t["restore_hint"], source="trainer_cfg.restore_hint")
            self._match_placement(read_checkpoint(path, "trainer_cfg.restore_hint"))
        if self.quant is not None and t["restore_hint"] in (0, None):
            if not self.quant.init_from:
                raise ConfigError("quant.init_from: QAT starts from a full-precision checkpoint; give its path")
            self.fp_state = load_fp_weights(self.model, self.quant.init_from, self.announce)
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = dict(cfg["optimizer_cfg"])
        if self.quant is not None:
            from ..distill import EmbeddingKDLoss, IDDLoss
            from ..param_groups import qat_param_groups
            from ..schedule import QGaitSchedule
            from ..teacher import make_teacher

            self.schedule = QGaitSchedule.from_config(self.quant)
            if self.quant.idd.enabled or self.quant.kd.enabled:
                if self.fp_state is None:
                    self.fp_state = unwrap_state_dict(read_checkpoint(self.quant.init_from, "quant.init_from"),
                                                      set(self.model.state_dict()))
                self.teacher = make_teacher(self.model, self.fp_state)
                self.teacher.to(self.device)
            if self.quant.idd.enabled:
                self.idd = IDDLoss(weight=self.quant.idd.weight, criterion=self.quant.idd.criterion)
            if self.quant.kd.enabled:
                self.kd = EmbeddingKDLoss(weight=self.quant.kd.weight)
            # step sizes in their own group without weight decay, for LSQ and QGait alike; idd.params
            # (all | quantizers) only applies when IDD is on
            params = qat_param_groups(self.model, self.quant.idd.params if self.quant.idd.enabled else "all",
                                      step_lr=o["lr"] * self.quant.step_lr_scale)
        solver = o.pop("solver")
        kw = {"lr": o["lr"], "weight_decay": o.get("weight_decay", 0.0)}
        if solver == "SGD":
            self.optimizer = torch.optim.SGD(params, momentum=o.get("momentum", 0.9), **kw)
        else:
            self.optimizer = getattr(torch.optim, solver)(params, **kw)
        s = cfg["scheduler_cfg"]
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=list(s["milestones"]),
                                                              gamma=s["gamma"])
        seqs = self.train_seqs()
        ids = sorted({s.sid for s in seqs})
        class_num = self.cfg["model_cfg"]["SeparateBNNecks"]["class_num"]
        if len(ids) > class_num:
            raise ConfigError(f"model_cfg.SeparateBNNecks.class_num: {class_num} but the training set has "
                              f"{len(ids)} identities")
        self.label_of = {sid: i for i, sid in enumerate(ids)}
        p, k = t["sampler"]["batch_size"]
        self.sampler = TripletSampler(seqs, p, k, seed=int(t.get("seed", 0)))
        hint = t["restore_hint"]
        if hint not in (0, None):
            self.restore(hint, strict=t.get("restore_ckpt_strict", True), source="trainer_cfg.restore_hint")
            assert not self._requantized, "the placement was matched before the optimizer was built"

    def train_seqs(self):
        if self._train_seqs is None:
            self._train_seqs = load_split(self.cfg["data_cfg"], "TRAIN_SET", progress=self.progress)
        return self._train_seqs

    # -- checkpoints -------------------------------------------------------------------------
    def _check_fresh_run(self, overwrite: bool) -> None:
        """A fresh run into a save_name that holds checkpoints stops (naming them) unless ``overwrite``;
        with it the old checkpoints are removed first, so none of them can pass for this run's latest."""
        ck_dir = os.path.join(self.out_dir, "checkpoints")
        old = checkpoint_files(ck_dir, self.save_name)
        if not old:
            return
        names = [os.path.basename(f) for f in old]
        if not overwrite:
            raise OutputExists(
                f"trainer_cfg.save_name: {self.save_name!r} already holds {len(old)} checkpoint(s) of an earlier run "
                f"in {ck_dir} ({short_repr(names)}); a fresh run (restore_hint: 0) would leave them beside its own, "
                "and the latest would be taken for this run's. Resume with trainer_cfg.restore_hint: <iteration>, "
                "choose another save_name, or pass --overwrite (trainer_cfg.overwrite: true) to remove them first")
        for f in old:
            os.remove(f)
        if self.announce:
            print(f"trainer_cfg.overwrite: removed {len(old)} checkpoint(s) of an earlier run from {ck_dir}",
                  flush=True)

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint: tensors and plain data only (read back with ``weights_only=True``)."""
        st = {"model": self.model.state_dict(), "iteration": self.iteration, "history": self.history,
              "val_history": self.val_history,
              "train_seconds": self.train_seconds, "rng": self.rng.getstate()}
        if self.optimizer is not None and self.scheduler is not None:
            st.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                      sampler=self.sampler.state_dict())
        if self.schedule is not None:
            st["schedule"] = self.schedule.state_dict()
        return st

    def save(self) -> str:
        """Write this iteration's checkpoint; a model with NaN/inf weights is never written (the last
        good checkpoint stays the latest) and stops the run with :class:`NonFiniteError`."""
        bad = _first_non_finite(self.model.state_dict())
        if bad:
            raise NonFiniteError(f"iteration {self.iteration}: non-finite weights ({len(bad)} tensors, e.g. "
                                 f"{short_repr(bad[:3])}); not saved. {self._last_good()}")
        path = checkpoint_path(self.out_dir, self.save_name, self.iteration)
        try:
            write_checkpoint(self.state_dict(), path)
        except OutputError as e:  # a full disk: say which checkpoint still holds the run
            raise OutputError(f"iteration {self.iteration}: {e}. {self._last_good()}") from None
        self.last_saved = path
        return path

    def _last_good(self) -> str:
        good = self.last_saved or self.checkpoint
        return f"The last good checkpoint is {good}" if good else "No checkpoint of this run was written"

    def resolve(self, hint: Any, save_name: Optional[str] = None, source: str = "restore_hint") -> str:
        """Checkpoint path for a restore hint: int = this run's iteration (0/-1 = latest), str = a file.

        ``source`` (the config key that gave ``hint``) starts the error when there is no checkpoint."""
        if isinstance(hint, str):
            return hint
        name = save_name or self.save_name
        if hint in (0, -1, None):
            ck_dir = os.path.join(output_dir(self.cfg, name), "checkpoints")
            files = glob.glob(os.path.join(ck_dir, f"{name}-*.pt"))
            its = [int(m.group(1)) for f in files if (m := re.search(r"-(\d+)\.pt$", f))]
            if not its:
                raise InputNotFound(f"{source}: {hint!r} asks for the latest checkpoint of {name!r}, but there is "
                                    f"none under {ck_dir} (train it first, or set {source} to a checkpoint file)")
            hint = max(its)
        return checkpoint_path(output_dir(self.cfg, name), name, int(hint))

    def _match_placement(self, ck: Dict[str, Any]) -> bool:
        """Re-convert the model when the checkpoint ``ck`` placed its quantizers otherwise (one trained
        before dataflow placement, or from another example batch), so that it loads; True when it did."""
        if self.quant is None:
            return False
        from ..quant.convert import requantize_for

        return requantize_for(self.model, self.quant, unwrap_state_dict(ck, set(self.model.state_dict())))

    def restore(self, hint: Any, strict: bool = True, save_name: Optional[str] = None,
                source: str = "restore_hint") -> None:
        """Load model (+ optimizer, scheduler, iteration, schedule, RNGs when present and training).

        ``source`` is the config key that gave ``hint``; errors about the checkpoint start with it."""
        path = self.resolve(hint, save_name, source)
        if self.announce:
            print(f"{source}: reading checkpoint {path}", flush=True)
        ck = read_checkpoint(path, source)
        where = f"{source}: {path!r}"
        self._requantized = self._match_placement(ck)
        model_keys = set(self.model.state_dict())
        sd = unwrap_state_dict(ck, model_keys)
        try:
            self.model.load_state_dict(sd, strict=strict)
        except (RuntimeError, ValueError) as e:  # keys, shapes or quantizer settings differ from the model's
            missing, unexpected = sorted(model_keys - set(sd)), sorted(set(sd) - model_keys)
            if missing or unexpected:
                detail = (f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                          f"{unexpected[:3]}")
            else:
                detail = " ".join(str(e).split())[:300]  # torch's message spans lines
            raise ConfigError(f"{where} does not fit the configured model ({detail}); expected a checkpoint "
                              "trained with this config") from None
        self.checkpoint = path
        if isinstance(hint, str) and "iteration" not in ck:
            return
        if self.optimizer is not None and isinstance(hint, int):
            for key, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("sampler", self.sampler),
                             ("schedule", self.schedule)):
                if key in ck and obj is not None:
                    try:
                        obj.load_state_dict(ck[key])
                    except (KeyError, ValueError) as e:
                        raise ConfigError(f"{where}: its {key} state does not fit this run ({e}); resume with "
                                          "the config the checkpoint was trained with") from None
            self.iteration = int(ck.get("iteration", 0))
            self.history = list(ck.get("history", []))
            self.val_history = list(ck.get("val_history", []))
            self.train_seconds = float(ck.get("train_seconds", 0.0))
            if "rng" in ck:
                self.rng.setstate(ck["rng"])

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        """Train to ``total_iter``.

        Returns ``{"iteration", "train_seconds", "history", "val_history", "checkpoint"}``. Holds the
        lock of the run's output folder (:mod:`qgait_plugin.lock`) throughout: a second run started
        into the same ``save_name`` is refused at once, naming this run's pid, before it checks or
        removes any checkpoint.
        """
        from ..lock import output_lock

        with output_lock(self.out_dir, "trainer_cfg.save_name"):
            return self._train()

    def _train(self) -> Dict[str, Any]:
        from tqdm import tqdm

        if self.optimizer is None:
            self._setup_training()
        optimizer, scheduler = self.optimizer, self.scheduler
        assert optimizer is not None and scheduler is not None  # made by _setup_training
        t = self.cfg["trainer_cfg"]
        total, save_iter, log_iter = t["total_iter"], t["save_iter"], max(1, t["log_iter"])
        val_iter = int(t.get("val_iter") or 0)
        frames = t["sampler"]["frames_num_fixed"]
        seqs = self.train_seqs()
        self.model.train()
        bar = tqdm(total=total, initial=self.iteration, desc=f"train {self.save_name}", dynamic_ncols=True,
                   disable=not self.progress)
        last = None
        while self.iteration < total:
            t0 = time.perf_counter()
            if self.schedule is not None:
                self.schedule.apply(self.iteration, self.model, optimizer, scheduler)
            sils, labels = collate_fixed(seqs, self.sampler.sample(), frames, self.rng, self.label_of)
            sils, labels = sils.to(self.device), labels.to(self.device)
            out = self.model(sils)
            total_loss = torch.zeros((), device=self.device)
            rec: Dict[str, float] = {}
            for prefix, w, key, fn in self.losses:
                loss, info = fn(out[key], labels)
                total_loss = total_loss + w * loss
                rec[prefix] = float(loss.detach())
                rec.update(info)
            if self.teacher is not None:
                with torch.no_grad():
                    t_emb = self.teacher(sils)["embeddings"]
                if self.idd is not None and self._idd_active():
                    idd_loss, _ = self.idd(out["embeddings"], t_emb, labels)
                    total_loss = total_loss + idd_loss
                    rec["idd"] = float(idd_loss.detach())
                if self.kd is not None:
                    kd_loss, _ = self.kd(out["embeddings"], t_emb)
                    total_loss = total_loss + kd_loss
                    rec["kd"] = float(kd_loss.detach())
            if not math.isfinite(float(total_loss.detach())):  # before the step: the weights stay the last good ones
                terms = ", ".join(f"{prefix}={rec[prefix]:.4g}" for prefix in [p for p, *_ in self.losses]
                                  + ["idd", "kd"] if prefix in rec)
                bar.close()
                raise NonFiniteError(f"iteration {self.iteration + 1}: non-finite loss ({terms}); training stopped "
                                     f"(a learning rate or loss weight too large?). {self._last_good()}")
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            optimizer.step()
            scheduler.step()
            self.iteration += 1
            self.train_seconds += time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]
            rec.update(iteration=self.iteration, loss=float(total_loss.detach()), lr=lr)
            self.history.append(rec)
            bar.update(1)
            if self.iteration % log_iter == 0 or self.iteration == total:
                bar.set_postfix(loss=f"{float(total_loss.detach()):.3f}", lr=f"{lr:.2e}")
            if val_iter and (self.iteration % val_iter == 0 or self.iteration == total):
                self._validate()
            if (save_iter and self.iteration % save_iter == 0) or self.iteration == total:
                last = self.save()
        bar.close()
        if last is None and self.iteration > 0:
            last = self.save()
        collapsed = collapsed_steps(self.model)
        if collapsed:  # not an error (the model still runs), but not what anyone meant to train
            total_entries = sum(collapsed.values())
            print(f"WARNING {self.save_name}: {total_entries} step entries of {len(collapsed)} quantizers sit at the "
                  f"1e-8 floor and quantize their channels to ~0 (e.g. {short_repr(sorted(collapsed)[:3])}): training "
                  "drove them down by many orders of magnitude; lower quant.step_lr_scale", flush=True)
        return {"iteration": self.iteration, "train_seconds": self.train_seconds, "history": self.history,
                "val_history": self.val_history, "checkpoint": last, "collapsed_steps": collapsed}

    def _idd_active(self) -> bool:
        """IDD acts from the start (``quant.idd.phase: all``) or once the soft phase has begun."""
        assert self.quant is not None
        if self.quant.idd.phase == "all" or self.schedule is None:
            return True
        return self.schedule.phase(self.iteration) == "soft"

    def _validate(self) -> None:
        """Evaluate on VAL_SET (``trainer_cfg.val_iter``), record it, and go back to training mode."""
        res = self.evaluate(split="VAL_SET")
        self.last_validation = dict(res, iteration=self.iteration)
        self.val_history.append({"iteration": self.iteration, "rank1": res["rank1"], "mAP": res["mAP"]})
        self.model.train()

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, restore: bool = False, split: str = "TEST_SET") -> Dict[str, Any]:
        """CASIA-B protocol on ``split`` (TEST_SET, or VAL_SET for model selection); with ``restore``
        load ``evaluator_cfg.restore_hint`` first.

        Besides the protocol's figures the result holds ``embeddings``, ``ids`` and
        ``rank1_per_subject`` (per condition, each test subject's share of correct rank-1 matches),
        which paired comparisons between methods are built on.
        """
        e = self.cfg["evaluator_cfg"]
        if restore:
            self.restore(e["restore_hint"], strict=e.get("restore_ckpt_strict", True), save_name=e.get("save_name"),
                         source="evaluator_cfg.restore_hint")
        seqs = load_split(self.cfg["data_cfg"], split, progress=self.progress)
        try:
            emb = extract_embeddings(self.model, seqs, self.device, e["sampler"].get("frames_all_limit", 0),
                                     desc=f"eval {self.save_name} {split}", progress=self.progress)
        except NonFiniteError as err:
            raise NonFiniteError(f"{self.checkpoint or 'the model of ' + repr(self.save_name)}: {err}") from None
        res = casia_b_protocol(emb, [s.sid for s in seqs], [s.type for s in seqs], [s.view for s in seqs],
                               metric=e["metric"], per_subject=True)
        res["embeddings"] = emb
        res["ids"] = [s.sid for s in seqs]
        res["split"] = split
        return res
