"""The ``quant:`` config section as one validated object.

Every key of the section is checked here, once: unknown keys, wrong types and out-of-range values
raise :class:`ConfigError` naming the key path (``quant.schedule.lr_scale``), the value and what is
allowed. Nothing is silently defaulted for a typo. The objects are frozen dataclasses, so a host
can pass them around without anyone mutating the experiment's settings behind its back.

The bit widths, rounding names and ``alpha`` range come from :mod:`qgait_plugin.spec`, whose
checks are used here; :meth:`QuantConfig.layer_specs` turns the section into one
:class:`~qgait_plugin.spec.QuantizerSpec` per quantizer.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, overload

from .errors import ConfigError, short_repr
from .spec import FP_BITS, QuantizerSpec, check_alpha, check_bits, check_rounding

IDD_CRITERIA = ("smooth_l1", "l1", "l2")
#: What trains in QAT: every parameter, or only quantizer steps and BatchNorm (``quant.idd.params``).
IDD_PARAMS = ("all", "quantizers")
#: When IDD acts: from the first QAT iteration, or only in the soft phase (``quant.idd.phase``).
IDD_PHASES = ("all", "soft")
LAST_LAYER_POLICIES = ("same", "8", "fp")
#: ``quant.act.signed`` as written -> the quantizer's ``signed`` (``None``: decide on the first batch).
_SIGNED = {"auto": None, None: None, "true": True, True: True, "false": False, False: False}


# --------------------------------------------------------------------------------------------
# small checkers: each names the key path, the value and what is allowed


def _type_name(types: Tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _check_keys(d: Any, path: str, allowed: Tuple[str, ...]) -> Mapping[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path}: expected a mapping with keys {list(allowed)}, "
                          f"got {type(d).__name__} {short_repr(d)}")
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}.{k}: unknown key{hint}; allowed keys: {list(allowed)}")
    return d


def _get(d: Mapping[str, Any], key: str, path: str, types: Tuple[type, ...], default: Any) -> Any:
    if key not in d or d[key] is None and default is None:
        return default
    v = d[key]
    # bool is an int subclass: never accept True where a number is wanted, or 1 where a flag is.
    if isinstance(v, bool) and bool not in types:
        raise ConfigError(f"{path}.{key}: expected {_type_name(types)}, got bool {short_repr(v)}")
    if not isinstance(v, types):
        raise ConfigError(f"{path}.{key}: expected {_type_name(types)}, got {type(v).__name__} {short_repr(v)}")
    if float in types and isinstance(v, int):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):  # NaN passes every comparison; inf every upper bound
        raise ConfigError(f"{path}.{key}: {v!r} is not a finite number")
    return v


@overload
def _bits(d: Mapping[str, Any], key: str, path: str, default: int) -> int: ...
@overload
def _bits(d: Mapping[str, Any], key: str, path: str, default: None) -> Optional[int]: ...
def _bits(d: Mapping[str, Any], key: str, path: str, default: Optional[int]) -> Optional[int]:
    # with an int default a missing key gives the default and an explicit null is refused by _get
    v = _get(d, key, path, (int,), default)
    return v if v is None else check_bits(v, f"{path}.{key}")


def _choice(d: Mapping[str, Any], key: str, path: str, choices: Tuple[str, ...], default: str) -> str:
    v = d.get(key, default)
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(f"{path}.{key}: {short_repr(v)} is not allowed; choose one of {list(choices)}")
    return v


def _positive(v: Optional[float], path: str, allow_zero: bool = False) -> None:
    if v is None:
        return
    if v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{path}: {short_repr(v)} must be {'>= 0' if allow_zero else '> 0'}")


# --------------------------------------------------------------------------------------------
# the section's parts


@dataclass(frozen=True)
class WeightQuantConfig:
    """How weights are quantized: signed, symmetric, per output channel unless told otherwise."""

    bits: int = 8
    per_channel: bool = True

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant.weight") -> WeightQuantConfig:
        d = _check_keys(d, path, ("bits", "per_channel"))
        return cls(bits=_bits(d, "bits", path, cls.bits),
                   per_channel=_get(d, "per_channel", path, (bool,), cls.per_channel))


@dataclass(frozen=True)
class ActQuantConfig:
    """How layer inputs are quantized. ``signed: auto`` (``None`` here) picks unsigned for non-negative inputs."""

    bits: int = 8
    signed: Optional[bool] = None

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant.act") -> ActQuantConfig:
        d = _check_keys(d, path, ("bits", "signed"))
        signed = d.get("signed", "auto")
        if not isinstance(signed, (str, bool, type(None))) or signed not in _SIGNED:
            raise ConfigError(f"{path}.signed: {short_repr(signed)} is not allowed; choose auto, true or false")
        return cls(bits=_bits(d, "bits", path, cls.bits), signed=_SIGNED[signed])


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer settings for modules whose qualified name matches a glob; first match wins."""

    match: str
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    enabled: Optional[bool] = None

    @classmethod
    def from_dict(cls, d: Any, path: str) -> LayerOverride:
        d = _check_keys(d, path, ("match", "weight_bits", "act_bits", "enabled"))
        if "match" not in d:
            raise ConfigError(f"{path}.match: missing; every override needs a glob on module names, "
                              "e.g. 'backbone.layer1.*'")
        match = _get(d, "match", path, (str,), None)
        if not match:
            raise ConfigError(f"{path}.match: must be a non-empty glob on module names")
        ov = cls(match=match, weight_bits=_bits(d, "weight_bits", path, None),
                 act_bits=_bits(d, "act_bits", path, None), enabled=_get(d, "enabled", path, (bool,), None))
        if ov.weight_bits is None and ov.act_bits is None and ov.enabled is None:
            raise ConfigError(f"{path}: override for {short_repr(match)} changes nothing; "
                              "give weight_bits, act_bits or enabled")
        return ov

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class SoftConfig:
    """The soft quantizer's surrogate sharpness ``alpha`` (optionally annealed) and the DSQ-style ablation."""

    alpha: float = 3.0
    alpha_end: Optional[float] = None
    soft_forward: bool = False

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant.schedule.soft") -> SoftConfig:
        d = _check_keys(d, path, ("alpha", "alpha_end", "soft_forward"))
        alpha = check_alpha(_get(d, "alpha", path, (float, int), cls.alpha), f"{path}.alpha")
        alpha_end = _get(d, "alpha_end", path, (float, int), None)
        if alpha_end is not None:
            alpha_end = check_alpha(alpha_end, f"{path}.alpha_end")
        return cls(alpha=alpha, alpha_end=alpha_end, soft_forward=_get(d, "soft_forward", path, (bool,), False))


@dataclass(frozen=True)
class ScheduleConfig:
    """Two phases: ``ste_iters`` of LSQ with STE rounding, then ``soft_iters`` with the soft quantizer.

    Iterations are counted from the host's iteration counter (0 at the start of QAT). The learning
    rates are multiplied by ``lr_scale`` once, at the switch.
    """

    ste_iters: int = 0
    soft_iters: int = 0
    lr_scale: float = 0.1
    soft: SoftConfig = field(default_factory=SoftConfig)

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant.schedule") -> ScheduleConfig:
        d = _check_keys(d, path, ("ste_iters", "soft_iters", "lr_scale", "soft"))
        ste = _get(d, "ste_iters", path, (int,), 0)
        soft = _get(d, "soft_iters", path, (int,), 0)
        _positive(ste, f"{path}.ste_iters", allow_zero=True)
        _positive(soft, f"{path}.soft_iters", allow_zero=True)
        lr_scale = _get(d, "lr_scale", path, (float, int), cls.lr_scale)
        _positive(lr_scale, f"{path}.lr_scale")
        if lr_scale > 1e3:
            raise ConfigError(f"{path}.lr_scale: {short_repr(lr_scale)} is out of range (0, 1000]")
        return cls(ste_iters=ste, soft_iters=soft, lr_scale=lr_scale,
                   soft=SoftConfig.from_dict(d.get("soft"), f"{path}.soft"))

    @property
    def total_iters(self) -> int:
        return self.ste_iters + self.soft_iters


@dataclass(frozen=True)
class IDDConfig:
    """Inter-class distance-guided distillation: loss weight, criterion, when it acts and which parameters train.

    ``phase: all`` adds the loss from the first QAT iteration; ``phase: soft`` only once the
    schedule has switched to the soft quantizer (phase 2).
    """

    enabled: bool = False
    weight: float = 1.0
    criterion: str = "smooth_l1"
    params: str = "all"
    phase: str = "all"

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant.idd") -> IDDConfig:
        present = d is not None
        d = _check_keys(d, path, ("enabled", "weight", "criterion", "params", "phase"))
        weight = _get(d, "weight", path, (float, int), 1.0)
        _positive(weight, f"{path}.weight", allow_zero=True)
        return cls(enabled=_get(d, "enabled", path, (bool,), present), weight=weight,
                   criterion=_choice(d, "criterion", path, IDD_CRITERIA, "smooth_l1"),
                   params=_choice(d, "params", path, IDD_PARAMS, "all"),
                   phase=_choice(d, "phase", path, IDD_PHASES, "all"))


@dataclass(frozen=True)
class KDConfig:
    """Plain embedding distillation: ``weight * mean((S - T)^2)`` against the same frozen FP teacher.

    The control for IDD: it pulls every embedding toward the teacher's, where IDD only keeps the
    relative distances between people. Off unless the section is given.
    """

    enabled: bool = False
    weight: float = 1.0

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant.kd") -> KDConfig:
        present = d is not None
        d = _check_keys(d, path, ("enabled", "weight"))
        weight = _get(d, "weight", path, (float, int), 1.0)
        _positive(weight, f"{path}.weight", allow_zero=True)
        return cls(enabled=_get(d, "enabled", path, (bool,), present), weight=weight)


def _step_lr_scale(d: Mapping[str, Any], path: str) -> float:
    v = float(_get(d, "step_lr_scale", path, (float, int), 1.0))
    if not 0 < v <= 1e3:
        raise ConfigError(f"{path}.step_lr_scale: {v!r} is out of range (0, 1000]; it multiplies the learning "
                          "rate of the quantizer step sizes")
    return v


#: Where the quantizers between layers go (``quant.residual.placement``).
PLACEMENTS = ("dataflow", "registry")


@dataclass(frozen=True)
class ResidualQuantConfig:
    """Quantizers on the tensors between layers: around adds, concats, pools (``quant.residual``).

    ``placement: dataflow`` (the default): the hosts run the model once on example inputs and place
    them from its dataflow (:mod:`qgait_plugin.quant.placement`), whatever its classes, so every conv,
    add and concat gets the quantized tensors an integer runtime needs. ``placement: registry``: only
    residual blocks that have a block handler get them (their input once for both paths, the branch's
    and the projection's outputs, ``bits``-wide signed grids), as checkpoints trained before dataflow
    placement hold them; such a checkpoint loads that way whatever this key says. New quantizers are
    ``bits`` wide. ``enabled: false`` keeps the layer-input quantizers only (checkpoints trained that
    way load).
    """

    enabled: bool = True
    bits: int = 8
    placement: str = "dataflow"

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant.residual") -> ResidualQuantConfig:
        d = _check_keys(d, path, ("enabled", "bits", "placement"))
        bits = _bits(d, "bits", path, cls.bits)
        if bits >= FP_BITS:
            raise ConfigError(f"{path}.bits: {bits!r} is not allowed here; choose 2..8 (turn the residual "
                              "quantizers off with enabled: false)")
        return cls(enabled=_get(d, "enabled", path, (bool,), cls.enabled), bits=bits,
                   placement=_choice(d, "placement", path, PLACEMENTS, cls.placement))


#: How post-training calibration sets activation steps (``quant.calibrate.estimator``).
CALIB_ESTIMATORS = ("mse", "percentile", "minmax")
#: What calibration does with BatchNorm statistics (``quant.calibrate.bn``).
CALIB_BN = ("keep", "reestimate")
#: What the optional step training after the statistics minimises (``quant.calibrate.objective``).
CALIB_OBJECTIVES = ("none", "idc", "kd", "task", "recon")


@dataclass(frozen=True)
class CalibrateConfig:
    """Post-training quantization (``qgait calibrate``): steps from statistics, then an optional objective.

    ``samples`` training sequences are drawn with ``seed`` and cut into batches of ``batch``
    sequences (``frames`` frames each; 0 takes the host's training ``frames_num_fixed``). Weight
    steps come from the weights (MSE-optimal clip per channel), activation steps from the whole
    calibration set by ``estimator`` (``mse``: MSE-optimal clip over a sample of every batch;
    ``percentile``: the ``percentile``-th percentile of ``|x|``; ``minmax``: the largest ``|x|``).
    ``bn: reestimate`` recomputes BatchNorm's running statistics on the quantized model.
    ``objective`` other than ``none`` then trains the steps only (and BatchNorm's affine
    parameters with ``train_bn``) for ``iters`` Adam iterations at ``lr`` against the frozen FP
    teacher: ``idc`` (the IDD loss of ``quant.idd``'s weight and criterion), ``kd`` (MSE to the
    teacher's embeddings), ``task`` (the host's training loss) or ``recon`` (every block's output
    against the FP block's).
    """

    samples: int = 256
    batch: int = 32
    frames: int = 0
    seed: int = 0
    estimator: str = "mse"
    percentile: float = 99.99
    bn: str = "keep"
    objective: str = "none"
    iters: int = 200
    lr: float = 1e-3
    train_bn: bool = False

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant.calibrate") -> CalibrateConfig:
        d = _check_keys(d, path, ("samples", "batch", "frames", "seed", "estimator", "percentile", "bn",
                                  "objective", "iters", "lr", "train_bn"))
        ints = {}
        for key, low in (("samples", 1), ("batch", 1), ("frames", 0), ("seed", 0), ("iters", 0)):
            v = _get(d, key, path, (int,), getattr(cls, key))
            if v < low:
                raise ConfigError(f"{path}.{key}: {short_repr(v)} must be >= {low}")
            ints[key] = v
        pct = _get(d, "percentile", path, (float, int), cls.percentile)
        if not 50 < pct <= 100:
            raise ConfigError(f"{path}.percentile: {short_repr(pct)} is out of range (50, 100]")
        lr = _get(d, "lr", path, (float, int), cls.lr)
        _positive(lr, f"{path}.lr")
        return cls(estimator=_choice(d, "estimator", path, CALIB_ESTIMATORS, cls.estimator), percentile=float(pct),
                   bn=_choice(d, "bn", path, CALIB_BN, cls.bn),
                   objective=_choice(d, "objective", path, CALIB_OBJECTIVES, cls.objective), lr=float(lr),
                   train_bn=_get(d, "train_bn", path, (bool,), cls.train_bn), **ints)


QUANT_KEYS = ("weight", "act", "overrides", "init_from", "first_layer_act", "last_layer", "rounding", "schedule",
              "idd", "kd", "step_lr_scale", "residual", "calibrate")


@dataclass(frozen=True)
class QuantConfig:
    """The whole ``quant:`` section.

    ``first_layer_act: false`` (default) keeps the first layer's input exact: silhouettes are binary
    and their input needs no quantizer. ``last_layer`` is ``same`` (quantize like the rest), ``"8"``
    (8-bit weights and input) or ``fp`` (leave it in floating point); the last layer is the last
    quantizable module in registration order (OpenGait: the BNNeck classifier).
    """

    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    overrides: Tuple[LayerOverride, ...] = ()
    init_from: Optional[str] = None
    first_layer_act: bool = False
    last_layer: str = "same"
    rounding: str = "ste"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    idd: IDDConfig = field(default_factory=IDDConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    step_lr_scale: float = 1.0
    residual: ResidualQuantConfig = field(default_factory=ResidualQuantConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)

    @classmethod
    def from_dict(cls, d: Any, path: str = "quant") -> QuantConfig:
        """Build and validate from the YAML section (a dict). ``None`` or ``{}`` gives the defaults (W8A8)."""
        if isinstance(d, QuantConfig):
            return d
        d = _check_keys(d, path, QUANT_KEYS)
        raw_ov = d.get("overrides") or []
        if not isinstance(raw_ov, (list, tuple)):
            raise ConfigError(f"{path}.overrides: expected a list of {{match: glob, ...}} mappings, "
                              f"got {type(raw_ov).__name__}")
        overrides = tuple(LayerOverride.from_dict(o, f"{path}.overrides[{i}]") for i, o in enumerate(raw_ov))
        return cls(
            weight=WeightQuantConfig.from_dict(d.get("weight"), f"{path}.weight"),
            act=ActQuantConfig.from_dict(d.get("act"), f"{path}.act"),
            overrides=overrides,
            init_from=_get(d, "init_from", path, (str,), None),
            first_layer_act=_get(d, "first_layer_act", path, (bool,), False),
            last_layer=_choice(d, "last_layer", path, LAST_LAYER_POLICIES, "same"),
            rounding=check_rounding(d.get("rounding", "ste"), f"{path}.rounding"),
            schedule=ScheduleConfig.from_dict(d.get("schedule"), f"{path}.schedule"),
            idd=IDDConfig.from_dict(d.get("idd"), f"{path}.idd"),
            kd=KDConfig.from_dict(d.get("kd"), f"{path}.kd"),
            step_lr_scale=_step_lr_scale(d, path),
            residual=ResidualQuantConfig.from_dict(d.get("residual"), f"{path}.residual"),
            calibrate=CalibrateConfig.from_dict(d.get("calibrate"), f"{path}.calibrate"),
        )

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict that :meth:`from_dict` turns back into an equal object."""
        out = asdict(self)
        out["overrides"] = [{k: v for k, v in o.items() if v is not None} for o in out["overrides"]]
        return out

    def layer_specs(self, name: str, is_first: bool, is_last: bool) -> Tuple[QuantizerSpec, QuantizerSpec]:
        """``(weight_spec, act_spec)`` for the module called ``name``, the first/last quantizable layer or not.

        Bits: see :meth:`layer_bits`. Weights are signed and per channel unless
        ``weight.per_channel`` is off; inputs are per tensor with ``act.signed``. Both start in
        ``rounding`` with the soft quantizer's ``alpha`` and ``soft_forward`` (the schedule
        switches the mode and ``alpha`` at run time).
        """
        w_bits, a_bits = self.layer_bits(name, is_first, is_last)
        soft = self.schedule.soft
        common: Dict[str, Any] = dict(rounding=self.rounding, alpha=soft.alpha, soft_forward=soft.soft_forward)
        return (QuantizerSpec("weight", w_bits, signed=True, per_channel=self.weight.per_channel, **common),
                QuantizerSpec("act", a_bits, signed=self.act.signed, **common))

    def residual_spec(self, signed: bool = True) -> QuantizerSpec:
        """The spec of a residual-block quantizer (``quant.residual``): branch and shortcut outputs are
        signed, a block's ReLU'd output unsigned."""
        soft = self.schedule.soft
        return QuantizerSpec("act", self.residual.bits, signed=signed, rounding=self.rounding, alpha=soft.alpha,
                             soft_forward=soft.soft_forward)

    def layer_bits(self, name: str, is_first: bool, is_last: bool) -> Tuple[int, int]:
        """(weight_bits, act_bits) for the module called ``name``; ``FP_BITS`` means full precision.

        Order of precedence: the first matching override, then the first/last-layer policy, then
        the section's defaults.
        """
        w, a = self.weight.bits, self.act.bits
        if is_last and self.last_layer == "8":
            w, a = 8, 8
        elif is_last and self.last_layer == "fp":
            w, a = FP_BITS, FP_BITS
        if is_first and not self.first_layer_act:
            a = FP_BITS
        for ov in self.overrides:
            if ov.matches(name):
                if ov.enabled is False:
                    return FP_BITS, FP_BITS
                w = ov.weight_bits if ov.weight_bits is not None else w
                a = ov.act_bits if ov.act_bits is not None else a
                break
        return w, a

    def unused_overrides(self, names: List[str]) -> List[LayerOverride]:
        """Overrides that match none of ``names``: almost always a typo in a glob."""
        return [ov for ov in self.overrides if not any(ov.matches(n) for n in names)]
