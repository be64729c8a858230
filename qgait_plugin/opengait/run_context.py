"""What the launcher learns from an OpenGait run it does not drive itself.

OpenGait's main script builds the model and runs training or testing without returning anything.
The launcher makes a :class:`RunContext` and hands it to
:func:`~qgait_plugin.opengait.registry.register`; the quant-aware model classes report to it: the
model they built, and each result of their ``run_test``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from torch import nn


@dataclass
class RunContext:
    """One run's observations. ``on_result(model, result)`` is called after each test run."""

    on_result: Optional[Callable[[nn.Module, Any], None]] = None
    #: the last model a registered class built (the launcher reads it after OpenGait's run)
    model: Optional[nn.Module] = None
    #: every test result, in order
    results: List[Any] = field(default_factory=list)

    def model_built(self, model: nn.Module) -> None:
        self.model = model

    def test_finished(self, model: nn.Module, result: Any) -> None:
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(model, result)
