"""Quantizers, rounding modes, quantized layers, conversion and the coverage report.

Plain PyTorch: nothing here imports a host. Import the verbs from :mod:`qgait_plugin`; this
package's ``__init__`` stays empty so :mod:`qgait_plugin.config` can import the rounding table
without a cycle.
"""
