"""``qgait opengait train|test``: register the plugin, then run OpenGait's own initialization and loop.

OpenGait's ``main.py`` parses ``sys.argv`` at import time and keeps its process-group setup in
its ``__main__`` block. The launcher therefore imports that file as a module (with an argv it
builds, so the parser sees our options), starts the process group itself (gloo on CPU, NCCL on
CUDA), loads the config the same way (user YAML merged into the checkout's
``configs/default.yaml`` with OpenGait's own merge function) and calls the main script's
``initialization`` and ``run_model``. Works as one process or under ``torchrun``.

Paths: OpenGait writes ``output/...`` relative to the working directory; ``--workdir`` picks it
(default: the checkout root, as with OpenGait's ``train.sh``). Relative data paths in the config
that do not exist from there are resolved against the checkout root.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..atomic import write_text_atomic
from ..errors import QGaitError, short_repr
from ..yamlfile import load_yaml
from .env import import_opengait


class LaunchError(QGaitError):
    """The run cannot start as configured; the message names the key and the fix."""


def load_config(og: Any, cfg_path: Path) -> Dict[str, Any]:
    """User YAML merged into ``<root>/configs/default.yaml`` by OpenGait's ``MergeCfgsDict``."""
    if not cfg_path.is_file():
        raise LaunchError(f"--cfgs: {cfg_path} does not exist")
    src = load_yaml(cfg_path, "OpenGait config")  # duplicate keys, NaN/inf, alias bombs, empty files: refused
    if not isinstance(src, dict):
        raise LaunchError(f"--cfgs: {cfg_path} is not a YAML mapping")
    dst = load_yaml(og.root / "configs" / "default.yaml", "OpenGait default config")
    if not isinstance(dst, dict):
        raise LaunchError(f"{og.root / 'configs' / 'default.yaml'}: is not a YAML mapping")
    og.common.MergeCfgsDict(src, dst)
    for sec in ([dst["data_cfg"]] if isinstance(dst.get("data_cfg"), dict) else dst.get("data_cfg") or []):
        for key in ("dataset_partition", "dataset_root"):
            val = sec.get(key)
            if isinstance(val, str) and not os.path.isabs(val) and not os.path.exists(val) \
                    and (og.root / val).exists():
                sec[key] = str(og.root / val)
    return dst


def check_fresh_run(cfg: Dict[str, Any], overwrite: bool) -> None:
    """A fresh training run (integer ``restore_hint`` 0) into a ``save_name`` that holds checkpoints stops, naming
    them, unless ``overwrite`` (``--overwrite`` or ``trainer_cfg.overwrite: true``, a key of ours that OpenGait
    ignores); with it rank 0 removes them first, so no checkpoint of the earlier run passes for this one's."""
    t = cfg.get("trainer_cfg") or {}
    if t.get("restore_hint", 0) != 0 or isinstance(t.get("restore_hint"), bool):
        return
    data = cfg.get("data_cfg")
    names = "_".join(d["dataset_name"] for d in data) if isinstance(data, list) else (data or {}).get("dataset_name")
    ck_dir = Path("output") / str(names) / str(cfg["model_cfg"]["model"]) / str(t["save_name"]) / "checkpoints"
    old = sorted(ck_dir.glob(f"{glob.escape(str(t['save_name']))}-*.pt")) if ck_dir.is_dir() else []
    if not old:
        return
    if not (overwrite or t.get("overwrite") is True):
        raise LaunchError(f"trainer_cfg.save_name: {t['save_name']!r} already holds {len(old)} checkpoint(s) of an "
                          f"earlier run in {ck_dir.resolve()} ({short_repr([p.name for p in old])}); a fresh run "
                          "(restore_hint: 0) would leave them beside its own. Resume with --iter N, choose another "
                          "save_name, or pass --overwrite (trainer_cfg.overwrite: true) to remove them first")
    if os.environ.get("RANK", "0") == "0":
        for f in old:
            f.unlink(missing_ok=True)
        print(f"qgait: removed {len(old)} checkpoint(s) of an earlier run from {ck_dir.resolve()}", flush=True)


def _load_main(og: Any, argv: List[str]) -> Any:
    """Import ``<root>/opengait/main.py`` as a module, its argument parser seeing ``argv``."""
    main_py = og.root / "opengait" / "main.py"
    spec = importlib.util.spec_from_file_location("qgait_opengait_main", main_py)
    if spec is None or spec.loader is None:
        raise LaunchError(f"{main_py}: cannot be imported as a Python module")
    mod = importlib.util.module_from_spec(spec)
    saved = sys.argv
    sys.argv = [str(main_py)] + argv
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = saved
    return mod


def _quant_bits(cfgs: Dict[str, Any]) -> Optional[Dict[str, int]]:
    if not cfgs.get("quant"):
        return None
    from ..config import QuantConfig

    q = QuantConfig.from_dict(cfgs["quant"])
    return {"weight": q.weight.bits, "act": q.act.bits}


def results_record(model: Any, result: Dict[str, Any], cfgs: Dict[str, Any], cfg_path: Path) -> Dict[str, Any]:
    """The results JSON ``qgait compare`` reads: metrics, model size and bit widths of one test run."""
    from ..quant.size import model_size_bytes

    net = getattr(model, "module", model)
    metrics = {}
    for k, v in (result or {}).items():
        try:
            metrics[k.split("/")[-1] if k.startswith("scalar/") else k] = float(v)
        except (TypeError, ValueError):
            continue
    data = cfgs["data_cfg"]
    return {"format": "qgait-results/1", "model": cfgs["model_cfg"]["model"],
            "dataset": data.get("test_dataset_name", data.get("dataset_name")),
            "save_name": cfgs["evaluator_cfg"]["save_name"], "restore_hint": cfgs["evaluator_cfg"]["restore_hint"],
            "config": str(cfg_path), "metrics": metrics, "size_bytes": int(model_size_bytes(net)),
            "bits": _quant_bits(cfgs)}


def run(phase: str, root: Optional[str], cfgs: str, device: str = "cuda", iteration: int = 0,
        log_to_file: bool = False, workdir: Optional[str] = None, cpu_overrides: bool = False,
        results: Optional[str] = None, dump_quantizers: Optional[str] = None, plugin: bool = True,
        overwrite: bool = False) -> int:
    """Run OpenGait's ``train`` or ``test`` phase with the plugin registered. Returns an exit code."""
    import torch
    import torch.distributed as dist

    from .registry import register
    from .run_context import RunContext
    from .runtime import CpuRuntime, apply_cpu_overrides, cpu_config_problems, init_process_group

    if phase not in ("train", "test"):
        raise LaunchError(f"phase must be train or test, got {phase!r}")
    if device not in ("cpu", "cuda"):
        raise LaunchError(f"--device must be cpu or cuda, got {device!r}")
    cfg_path = Path(cfgs).resolve()
    if not cfg_path.is_file():
        raise LaunchError(f"--cfgs: {cfgs} does not exist (expected an OpenGait config YAML)")
    og = import_opengait(root)
    run_ctx = RunContext()
    if plugin:  # off only to compare against untouched OpenGait
        register(og, context=run_ctx)
    if workdir:
        if Path(workdir).exists() and not Path(workdir).is_dir():
            raise LaunchError(f"--workdir {workdir}: is a file; expected a folder (output/ is written there)")
        Path(workdir).mkdir(parents=True, exist_ok=True)
    if results and Path(results).is_dir():
        raise LaunchError(f"--results {results}: is a folder; expected the path of a JSON file")
    os.chdir(Path(workdir).resolve() if workdir else og.root)
    cfg = load_config(og, cfg_path)
    data = cfg.get("data_cfg") or {}
    for key in ("dataset_root", "dataset_partition"):
        value = data.get(key)
        if isinstance(value, str) and not os.path.exists(value):
            what = "data set folder" if key == "dataset_root" else "partition JSON"
            raise LaunchError(f"{cfg_path}: data_cfg.{key} = {value!r} does not exist (relative paths are taken "
                              f"from {os.getcwd()}); set it to your {what}")
    if iteration:
        cfg["evaluator_cfg"]["restore_hint"] = int(iteration)
        cfg["trainer_cfg"]["restore_hint"] = int(iteration)
    training = phase == "train"
    if training:
        check_fresh_run(cfg, overwrite)
    world = int(os.environ.get("WORLD_SIZE", "1"))

    runtime = None
    if device == "cpu":
        problems = cpu_config_problems(cfg, world, training)
        if problems and not cpu_overrides:
            raise LaunchError(f"{cfg_path}: these keys must change to run on CPU (or pass --cpu-overrides to set "
                              "them for this run):\n  " + "\n  ".join(map(str, problems)))
        if problems:
            apply_cpu_overrides(cfg, problems)
            print("qgait: CPU overrides: " + "; ".join(f"{p.key}={p.needed!r}" for p in problems), flush=True)
    elif not torch.cuda.is_available():
        raise LaunchError("--device cuda: no CUDA device here; pass --device cpu")

    init_process_group(device)
    if device == "cuda" and dist.get_world_size() != torch.cuda.device_count():
        raise LaunchError(f"world size {dist.get_world_size()} != {torch.cuda.device_count()} visible GPUs "
                          "(OpenGait runs one process per GPU)")
    argv = ["--cfgs", str(cfg_path), "--phase", phase] + (["--log_to_file"] if log_to_file else [])
    main = _load_main(og, argv)
    if device == "cpu":
        runtime = CpuRuntime().install(og, extra_namespaces=(main,))

    def write_results(model: Any, result: Any) -> None:
        if dist.get_rank() != 0 or result is None:
            return
        rec = results_record(model, result, cfg, cfg_path)
        default = Path("output") / rec["dataset"] / rec["model"] / rec["save_name"] / "qgait_results.json"
        out = Path(results) if results else default
        replacing = out.exists()
        write_text_atomic(str(out), json.dumps(rec, indent=2))  # a reader sees the old record or the new one
        print(f"qgait: results written to {out.resolve()}" + (" (replacing the results of an earlier test)"
                                                               if replacing else ""), flush=True)

    run_ctx.on_result = write_results
    try:
        main.initialization(cfg, training)
        main.run_model(cfg, training)
        if dump_quantizers and run_ctx.model is not None:
            from ..quant.convert import iter_quantizers

            steps = {n: q.effective_step().cpu() for n, q in iter_quantizers(run_ctx.model)}
            target = Path(dump_quantizers.replace("{rank}", str(dist.get_rank())))
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"rank": dist.get_rank(), "iteration": run_ctx.model.iteration, "steps": steps}, target)
    finally:
        if plugin:
            register(og, context=None)  # the classes stop reporting to this run
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if runtime is not None:
            runtime.uninstall()
    return 0
