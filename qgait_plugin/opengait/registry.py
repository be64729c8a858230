"""Register the plugin into OpenGait's model and loss lookups.

OpenGait's main script builds ``getattr(modeling.models, cfg.model_cfg.model)(cfgs, training)``
and its loss aggregator looks losses up by ``type`` on ``modeling.losses``. :func:`register`
replaces every model class there that derives from ``BaseModel`` with its quant-aware subclass of
the same name (:mod:`.quant_model`), adds the IDD loss type (:mod:`.idd_loss`), the handlers
for OpenGait's per-part FC modules (:mod:`.handlers`) and for its residual blocks (:mod:`.blocks`).
"""
from __future__ import annotations

import inspect
from typing import Any, List, Optional

from .blocks import register_opengait_blocks
from .handlers import register_opengait_handlers
from .idd_loss import IDD_LOSS_TYPE, make_idd_loss_class
from .quant_model import make_quant_aware
from .run_context import RunContext


def register(og: Any, context: Optional[RunContext] = None) -> List[str]:
    """Register quant-aware model classes, the IDD loss and the FC handlers into OpenGait ``og``.

    ``og`` is the namespace from :func:`qgait_plugin.opengait.env.import_opengait`. Idempotent.
    The registered classes report the models they build and their test results to ``context``
    (the launcher's); a later call replaces the context of every registered class. Returns the
    model names registered.
    """
    base = og.base_model.BaseModel
    names = []
    for name, obj in list(vars(og.models).items()):
        if not inspect.isclass(obj) or obj is base or not issubclass(obj, base):
            continue
        if "_qgait_original" not in obj.__dict__:
            obj = make_quant_aware(obj)
            setattr(og.models, name, obj)
        obj._qgait_context = context
        names.append(name)
    if not hasattr(og.losses, IDD_LOSS_TYPE):
        setattr(og.losses, IDD_LOSS_TYPE, make_idd_loss_class(og.losses_base))
    register_opengait_handlers(og.modules)
    register_opengait_blocks(og.modules)
    return sorted(names)
