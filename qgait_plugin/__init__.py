"""qgait-plugin: quantization-aware training for gait recognition (QGait).

The core (this package's top-level names) is plain PyTorch: a soft quantizer with LSQ step sizes,
model conversion, the ``quant:`` config, IDD distillation and the two-phase schedule. Hosts that
drive it live in :mod:`qgait_plugin.opengait` (OpenGait) and :mod:`qgait_plugin.local` (the
built-in trainer used by ``qgait demo``).
"""
from .checkpoint import CheckpointError, load_float_state_dict, read_checkpoint
from .config import QuantConfig
from .errors import ConfigError, QGaitError
from .quant.convert import (dequantize_model, iter_quantizers, quantize_model, quantizer_parameters, set_quant_enabled,
                            set_rounding)
from .quant.coverage import CoverageReport, coverage_report
from .quant.handlers import LayerHandler, ParamMatmulHandler, register_handler
from .quant.quantizer import LSQQuantizer, fake_quantize, set_init_reducer
from .quant.size import model_size_bytes
from .spec import QuantizerSpec

__version__ = "0.1.0"

__all__ = [
    "QGaitError", "ConfigError", "CheckpointError", "read_checkpoint", "load_float_state_dict", "QuantConfig", "QuantizerSpec", "quantize_model", "dequantize_model", "set_rounding", "set_quant_enabled",
    "iter_quantizers", "quantizer_parameters", "coverage_report", "CoverageReport", "register_handler",
    "LayerHandler", "ParamMatmulHandler", "LSQQuantizer", "fake_quantize", "set_init_reducer", "model_size_bytes",
]

try:  # IDD and the schedule (issue 3) join the public names when present
    from .distill import IDDLoss, attach_teacher, idd_param_groups, make_teacher  # noqa: F401
    from .schedule import QGaitSchedule  # noqa: F401

    __all__ += ["IDDLoss", "make_teacher", "attach_teacher", "idd_param_groups", "QGaitSchedule"]
except ImportError:  # pragma: no cover - removed once both modules land
    pass
