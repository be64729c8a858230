"""Load an OpenGait-style YAML for the built-in host.

The built-in host reads the same sections as OpenGait (``data_cfg``, ``model_cfg``, ``loss_cfg``,
``optimizer_cfg``, ``scheduler_cfg``, ``trainer_cfg``, ``evaluator_cfg``) plus ``quant:``, so a user
moves between the two with one vocabulary. The user's file is merged into :data:`DEFAULTS`; every
key in a section we read must be one we use or one OpenGait has that we knowingly ignore (listed in
:data:`IGNORED_KEYS`). Anything else is a typo or a feature we lack, and we say so instead of
silently training something other than what the user wrote.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config import ConfigError, QuantConfig
from ..errors import short_repr
from ..yamlfile import load_yaml

#: Built-in defaults: a compact GaitBase-style model on 32 x 22 silhouettes, sized for a CPU.
DEFAULTS: Dict[str, Any] = {
    "data_cfg": {
        "dataset_name": "SynthGait",
        "dataset_root": "datasets/synth",
        "dataset_partition": "datasets/synth/partition.json",
        "test_dataset_name": None,
        "num_workers": 0,
        "cache": True,
        "resolution": [32, 22],
    },
    "model_cfg": {
        "model": "GaitBaseLite",
        "channels": [16, 32, 64],
        "layers": [1, 1, 1],
        "strides": [1, 2, 1],
        "bin_num": [16],
        "SeparateFCs": {"out_channels": 64},
        "SeparateBNNecks": {"class_num": 74},
    },
    "loss_cfg": [
        {"type": "TripletLoss", "loss_term_weight": 1.0, "margin": 0.2, "log_prefix": "triplet"},
        {"type": "CrossEntropyLoss", "loss_term_weight": 1.0, "scale": 1.0, "label_smooth": 0.1,
         "log_prefix": "softmax"},
    ],
    "optimizer_cfg": {"solver": "Adam", "lr": 1e-3, "weight_decay": 5e-4, "momentum": 0.9},
    "scheduler_cfg": {"scheduler": "MultiStepLR", "milestones": [], "gamma": 0.1},
    "trainer_cfg": {
        "save_name": "tmp",
        "output_root": "output",
        "total_iter": 300,
        "save_iter": 100,
        "log_iter": 25,
        "val_iter": 0,
        "restore_hint": 0,
        "restore_ckpt_strict": True,
        # ours (OpenGait has no such key): a fresh run may replace the checkpoints of an earlier run
        # under the same save_name (they are removed first); without it the run stops and names them
        "overwrite": False,
        "with_test": False,
        "seed": 0,
        "device": "auto",
        "num_threads": 0,
        "sampler": {"batch_size": [8, 4], "frames_num_fixed": 12, "type": "TripletSampler",
                    "sample_type": "fixed_unordered"},
        "transform": [{"type": "BaseSilCuttingTransform"}],
    },
    "evaluator_cfg": {
        "restore_hint": 0,
        "restore_ckpt_strict": True,
        "save_name": None,
        "metric": "euc",
        "eval_func": "evaluate_indoor_dataset",
        "sampler": {"batch_size": 1, "sample_type": "all_ordered", "type": "InferenceSampler",
                    "frames_all_limit": 64},
        "transform": [{"type": "BaseSilCuttingTransform"}],
    },
}

#: Keys OpenGait configs carry that this host reads past on purpose (single process, CPU, no AMP).
IGNORED_KEYS: Dict[str, Tuple[str, ...]] = {
    "data_cfg": ("remove_no_gallery", "data_in_use", "test_dataset_root"),
    "model_cfg": ("backbone_cfg", "Backbone", "block"),
    "optimizer_cfg": (),
    "scheduler_cfg": (),
    "trainer_cfg": ("enable_float16", "fix_BN", "sync_BN", "find_unused_parameters", "optimizer_reset",
                    "scheduler_reset"),
    "evaluator_cfg": ("enable_float16", "cross_view_gallery"),
}
IGNORED_SAMPLER_KEYS = ("batch_shuffle", "frames_num_max", "frames_num_min", "frames_skip_num")

SECTIONS = ("data_cfg", "model_cfg", "loss_cfg", "optimizer_cfg", "scheduler_cfg", "trainer_cfg", "evaluator_cfg")
LOSS_KEYS = {
    "TripletLoss": ("type", "loss_term_weight", "margin", "log_prefix"),
    "CrossEntropyLoss": ("type", "loss_term_weight", "scale", "label_smooth", "log_prefix", "log_accuracy"),
}
SOLVERS = ("SGD", "Adam", "AdamW")
SCHEDULERS = ("MultiStepLR",)
MODELS = ("GaitBaseLite",)


def merge_dicts(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge; lists and scalars in ``over`` replace those in ``base``."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_section(user: Mapping[str, Any], name: str, src: str) -> None:
    """Every key of a user section must be a default key or an explicitly ignored OpenGait key."""
    sec = user.get(name)
    if sec is None:
        return
    if name == "loss_cfg":
        items = sec if isinstance(sec, list) else [sec]
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or item.get("type") not in LOSS_KEYS:
                raise ConfigError(f"{src}: loss_cfg[{i}]: expected a mapping with type one of {list(LOSS_KEYS)}, "
                                  f"got {short_repr(item)}")
            for k in item:
                if k not in LOSS_KEYS[item["type"]]:
                    raise ConfigError(f"{src}: loss_cfg[{i}].{k}: unknown key for {item['type']}; "
                                      f"allowed: {list(LOSS_KEYS[item['type']])}")
        return
    if not isinstance(sec, Mapping):
        raise ConfigError(f"{src}: {name}: expected a mapping, got {type(sec).__name__} {short_repr(sec)}")
    allowed = set(DEFAULTS[name]) | set(IGNORED_KEYS[name])
    for k, v in sec.items():
        if k not in allowed:
            raise ConfigError(f"{src}: {name}.{k}: unknown key; this host reads {sorted(DEFAULTS[name])} "
                              f"and ignores OpenGait's {list(IGNORED_KEYS[name])}")
        if k == "sampler" and isinstance(v, Mapping):
            ok_sampler = set(DEFAULTS[name]["sampler"]) | set(IGNORED_SAMPLER_KEYS)
            for sk in v:
                if sk not in ok_sampler:
                    raise ConfigError(f"{src}: {name}.sampler.{sk}: unknown key; allowed: {sorted(ok_sampler)}")
        if name == "model_cfg" and k in ("SeparateFCs", "SeparateBNNecks") and isinstance(v, Mapping):
            ok_head = {"SeparateFCs": ("in_channels", "out_channels", "parts_num"),
                       "SeparateBNNecks": ("class_num", "in_channels", "parts_num")}[k]
            for sk in v:
                if sk not in ok_head:
                    raise ConfigError(f"{src}: model_cfg.{k}.{sk}: unknown key; allowed: {list(ok_head)}")


def _validate(cfg: Dict[str, Any], src: str) -> None:
    """Values: the handful of choices and shapes the host depends on."""
    m = cfg["model_cfg"]
    if m["model"] not in MODELS:
        raise ConfigError(f"{src}: model_cfg.model: {short_repr(m['model'])} is not a built-in model; "
                          f"choose one of {list(MODELS)} (OpenGait's models run through the OpenGait host)")
    for key in ("channels", "layers", "strides"):
        v = m[key]
        if not isinstance(v, list) or not v or not all(isinstance(x, int) and x > 0 for x in v):
            raise ConfigError(f"{src}: model_cfg.{key}: expected a non-empty list of positive ints, "
                              f"got {short_repr(v)}")
    if not (len(m["channels"]) == len(m["layers"]) == len(m["strides"])):
        raise ConfigError(f"{src}: model_cfg.channels/layers/strides must have the same length, got "
                          f"{m['channels']}, {m['layers']}, {m['strides']}")
    s = cfg["trainer_cfg"]["sampler"]
    bs = s["batch_size"]
    if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(x, int) and x > 0 for x in bs)):
        raise ConfigError(f"{src}: trainer_cfg.sampler.batch_size: expected [P, K] positive ints, got {short_repr(bs)}")
    if bs[0] < 2:
        raise ConfigError(f"{src}: trainer_cfg.sampler.batch_size: P={bs[0]}; triplets need at least 2 identities")
    if s.get("sample_type", "fixed_unordered") != "fixed_unordered":
        raise ConfigError(f"{src}: trainer_cfg.sampler.sample_type: {short_repr(s['sample_type'])}; "
                          "this host supports fixed_unordered")
    if cfg["optimizer_cfg"]["solver"] not in SOLVERS:
        raise ConfigError(f"{src}: optimizer_cfg.solver: {short_repr(cfg['optimizer_cfg']['solver'])}; "
                          f"choose one of {list(SOLVERS)}")
    if cfg["scheduler_cfg"]["scheduler"] not in SCHEDULERS:
        raise ConfigError(f"{src}: scheduler_cfg.scheduler: {short_repr(cfg['scheduler_cfg']['scheduler'])}; "
                          f"choose one of {list(SCHEDULERS)}")
    if cfg["evaluator_cfg"]["metric"] not in ("euc", "cos"):
        raise ConfigError(f"{src}: evaluator_cfg.metric: {short_repr(cfg['evaluator_cfg']['metric'])}; "
                          "choose euc or cos")
    if cfg["evaluator_cfg"]["eval_func"] != "evaluate_indoor_dataset":
        raise ConfigError(f"{src}: evaluator_cfg.eval_func: {short_repr(cfg['evaluator_cfg']['eval_func'])}; "
                          "the built-in host implements the CASIA-B protocol only (evaluate_indoor_dataset)")
    if s.get("type", "TripletSampler") != "TripletSampler":
        raise ConfigError(f"{src}: trainer_cfg.sampler.type: {short_repr(s['type'])}; "
                          "this host trains with TripletSampler (P x K)")
    res = cfg["data_cfg"]["resolution"]
    if not (isinstance(res, list) and len(res) == 2 and all(isinstance(x, int) and x > 0 for x in res)):
        raise ConfigError(f"{src}: data_cfg.resolution: expected [height, width] after cutting, e.g. [64, 44] "
                          f"or [32, 22], got {short_repr(res)}")
    for key in ("total_iter", "save_iter", "log_iter", "val_iter", "seed", "num_threads"):
        v = cfg["trainer_cfg"][key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{src}: trainer_cfg.{key}: expected an int >= 0, got {short_repr(v)}")
    for key, v in (("model_cfg.SeparateBNNecks.class_num", m["SeparateBNNecks"].get("class_num")),
                   ("model_cfg.SeparateFCs.out_channels", m["SeparateFCs"].get("out_channels"))):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{src}: {key}: expected an int >= 1, got {short_repr(v)}")
    bins = m["bin_num"]
    if not isinstance(bins, list) or not bins or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                          for x in bins):
        raise ConfigError(f"{src}: model_cfg.bin_num: expected a non-empty list of positive ints, "
                          f"got {short_repr(bins)}")
    for key in ("overwrite", "restore_ckpt_strict", "with_test"):
        if not isinstance(cfg["trainer_cfg"][key], bool):
            raise ConfigError(f"{src}: trainer_cfg.{key}: expected true or false, "
                              f"got {short_repr(cfg['trainer_cfg'][key])}")
    for sec in ("trainer_cfg", "evaluator_cfg"):
        hint = cfg[sec]["restore_hint"]
        if not (hint is None or isinstance(hint, str) or (isinstance(hint, int) and not isinstance(hint, bool))):
            raise ConfigError(f"{src}: {sec}.restore_hint: expected an iteration (int) or a checkpoint path, "
                              f"got {short_repr(hint)}")
    o = cfg["optimizer_cfg"]
    for key in ("lr", "weight_decay", "momentum"):
        v = o.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{src}: optimizer_cfg.{key}: expected a finite number >= 0, got {short_repr(v)}")
    gamma = cfg["scheduler_cfg"].get("gamma", 0.1)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise ConfigError(f"{src}: scheduler_cfg.gamma: expected a finite number > 0, got {short_repr(gamma)}")


def build_config(user: Optional[Mapping[str, Any]] = None, src: str = "<dict>") -> Dict[str, Any]:
    """Merge ``user`` into the defaults, check it, and parse ``quant:`` into a :class:`QuantConfig`.

    The returned dict keeps the OpenGait shape; ``cfg["quant"]`` is a QuantConfig or None.
    """
    user = dict(user or {})
    for k in user:
        if k not in SECTIONS and k != "quant":
            raise ConfigError(f"{src}: {k}: unknown top-level section; allowed: {list(SECTIONS) + ['quant']}")
    for name in SECTIONS:
        _check_section(user, name, src)
    cfg = merge_dicts({k: v for k, v in DEFAULTS.items() if k != "loss_cfg"}, {k: v for k, v in user.items()
                                                                         if k not in ("loss_cfg", "quant")})
    loss = user.get("loss_cfg", DEFAULTS["loss_cfg"])
    cfg["loss_cfg"] = copy.deepcopy(loss if isinstance(loss, list) else [loss])
    _validate(cfg, src)
    q = user.get("quant")
    try:
        cfg["quant"] = QuantConfig.from_dict(q) if q is not None else None
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None
    return cfg


def load_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Read a YAML file (plus optional programmatic ``overrides`` merged on top) into a checked config."""
    user = load_yaml(path, "config file")  # duplicate keys, NaN/inf, alias bombs and empty files are refused
    if not isinstance(user, Mapping):
        raise ConfigError(f"{path}: expected a YAML mapping of config sections, got {type(user).__name__}")
    if overrides:
        user = merge_dicts(dict(user), overrides)
    return build_config(user, src=path)


def output_dir(cfg: Mapping[str, Any], save_name: Optional[str] = None) -> str:
    """``<output_root>/<dataset>/<model>/<save_name>``, OpenGait's layout."""
    t = cfg["trainer_cfg"]
    return os.path.join(t["output_root"], cfg["data_cfg"]["dataset_name"], cfg["model_cfg"]["model"],
                        save_name or t["save_name"])


def loss_terms(cfg: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The loss list with each term's defaults filled in."""
    out = []
    for item in cfg["loss_cfg"]:
        base = next(d for d in DEFAULTS["loss_cfg"] if d["type"] == item["type"])
        out.append({**base, **item})
    return out
