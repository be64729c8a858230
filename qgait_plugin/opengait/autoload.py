"""Imported by a patched OpenGait ``main.py``: register the plugin into the already imported packages.

The main script's folder is ``sys.path[0]``, so ``modeling`` / ``utils`` resolve to that
checkout; this registers into exactly the module objects its lookups use. Nothing else changes
(the run stays on OpenGait's NCCL/CUDA path; use ``qgait opengait --device cpu`` for CPU).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

from .registry import register


def _namespace() -> SimpleNamespace:
    imp = importlib.import_module
    models = imp("modeling.models")
    root = Path(str(models.__file__)).resolve().parents[3]  # <root>/opengait/modeling/models/__init__.py
    return SimpleNamespace(root=root, models=models, losses=imp("modeling.losses"),
                           base_model=imp("modeling.base_model"), modules=imp("modeling.modules"),
                           losses_base=imp("modeling.losses.base"))


REGISTERED = register(_namespace())
