"""Quantizers, rounding modes, quantized layers, conversion and the coverage report.

Plain PyTorch: nothing here imports a host. Import the verbs from :mod:`qgait_plugin`. The
settings of one quantizer are a :class:`qgait_plugin.spec.QuantizerSpec`, which lives outside
this package so the config can check a ``quant:`` section without loading it.
"""
