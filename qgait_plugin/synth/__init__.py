"""Generated gait silhouettes in OpenGait's on-disk format (the ``qgait synth`` command).

A host for the rest of the project: nothing in the core imports it. The layout it writes (and the
CASIA-B type and view names) is :mod:`qgait_plugin.layout`'s.
"""
from .generate import QUICK, SynthConfig, generate_dataset, render_sequence
from .pretreat import pretreat
from .render import NoiseConfig

__all__ = ["generate_dataset", "render_sequence", "SynthConfig", "NoiseConfig", "QUICK", "pretreat"]
