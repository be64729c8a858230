"""Find an OpenGait checkout and import its packages under the names its main script uses.

OpenGait's ``main.py`` imports ``modeling`` and ``utils`` as top-level packages with
``<root>/opengait`` on ``sys.path``; importing them under any other name gives separate module
objects that the main script never sees. So this module puts that folder on ``sys.path`` and
imports the same names, and refuses when another checkout's ``modeling`` is already loaded.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from ..errors import QGaitError

ENV_VAR = "OPENGAIT_ROOT"


class OpenGaitNotFound(QGaitError):
    """No usable OpenGait checkout at the given root (or none given)."""


def find_root(root: Optional[str] = None) -> Path:
    """The checkout root: ``root`` if given, else ``$OPENGAIT_ROOT``; it must hold ``opengait/main.py``."""
    raw = root or os.environ.get(ENV_VAR)
    if not raw:
        raise OpenGaitNotFound(f"no OpenGait checkout given: pass --root PATH or set {ENV_VAR}")
    path = Path(raw).expanduser().resolve()
    if not (path / "opengait" / "main.py").is_file():
        raise OpenGaitNotFound(f"{path} is not an OpenGait checkout: expected {path / 'opengait' / 'main.py'}")
    return path


def import_opengait(root: Optional[str] = None) -> SimpleNamespace:
    """Import OpenGait's packages from ``root`` and return them in a namespace.

    Fields: ``root`` (Path), ``models``, ``losses``, ``base_model``, ``modules``, ``loss_aggregator``,
    ``losses_base``, ``utils``, ``common``, ``evaluator``, ``metric``, ``sampler``.
    """
    path = find_root(root)
    src = str(path / "opengait")
    loaded = sys.modules.get("modeling")
    if loaded is not None:
        # ``modeling`` has no __init__.py in OpenGait: a namespace package, located by __path__
        places = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
        if not places and getattr(loaded, "__file__", None):
            places = [Path(str(loaded.__file__)).resolve().parent]
        where = places[0] if places else "an unknown place"
        if not any(p.parent == path / "opengait" for p in places):
            raise OpenGaitNotFound(f"a package called 'modeling' is already imported from {where}; "
                                   f"cannot load OpenGait from {path} in the same process")
    if src not in sys.path:
        sys.path.insert(0, src)
    imp = importlib.import_module
    return SimpleNamespace(
        root=path, models=imp("modeling.models"), losses=imp("modeling.losses"), base_model=imp("modeling.base_model"),
        modules=imp("modeling.modules"), loss_aggregator=imp("modeling.loss_aggregator"),
        losses_base=imp("modeling.losses.base"), utils=imp("utils"), common=imp("utils.common"),
        evaluator=imp("evaluation.evaluator"), metric=imp("evaluation.metric"), sampler=imp("data.sampler"))
