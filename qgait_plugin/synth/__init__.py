"""Generated gait silhouettes in OpenGait's on-disk format (the ``qgait synth`` command).

A host for the rest of the project: nothing in the core imports it.
"""
from .generate import QUICK, TYPES, VIEWS, SynthConfig, generate_dataset, render_sequence
from .pretreat import pretreat
from .render import NoiseConfig
from .writer import PARTITION_NAME, load_sequence

__all__ = ["generate_dataset", "render_sequence", "SynthConfig", "NoiseConfig", "QUICK", "TYPES",
           "VIEWS", "PARTITION_NAME", "pretreat", "load_sequence"]
