"""qgait-plugin: quantization-aware training for gait recognition (QGait).

The core (this package's top-level names) is plain PyTorch: a soft quantizer with LSQ step sizes
built from a :class:`QuantizerSpec`, model conversion, the ``quant:`` config, IDD distillation
from a frozen FP teacher, the optimizer's parameter groups, the two-phase schedule and checkpoint
reading. Hosts that drive it live in :mod:`qgait_plugin.opengait` (OpenGait) and
:mod:`qgait_plugin.local` (the built-in trainer used by ``qgait demo``); the core never imports them.
"""
from .checkpoint import CheckpointError, load_float_state_dict, read_checkpoint
from .config import QuantConfig
from .distill import IDDLoss
from .errors import ConfigError, QGaitError
from .param_groups import qat_param_groups
from .quant.convert import (
    dequantize_model,
    iter_quantizers,
    quantize_model,
    quantizer_parameters,
    set_quant_enabled,
    set_rounding,
)
from .quant.coverage import CoverageReport, coverage_report
from .quant.handlers import LayerHandler, ParamMatmulHandler, register_handler
from .quant.quantizer import LSQQuantizer, fake_quantize, set_init_reducer
from .quant.size import model_size_bytes
from .schedule import QGaitSchedule
from .spec import QuantizerSpec
from .teacher import FrozenTeacher, attach_teacher, get_teacher, make_teacher

__version__ = "0.1.0"

__all__ = [
    "QGaitError", "ConfigError", "CheckpointError", "QuantConfig", "QuantizerSpec", "quantize_model",
    "dequantize_model", "set_rounding", "set_quant_enabled", "iter_quantizers", "quantizer_parameters",
    "coverage_report", "CoverageReport", "register_handler", "LayerHandler", "ParamMatmulHandler", "LSQQuantizer",
    "fake_quantize", "set_init_reducer", "model_size_bytes", "IDDLoss", "FrozenTeacher", "make_teacher",
    "attach_teacher", "get_teacher", "qat_param_groups", "QGaitSchedule", "read_checkpoint", "load_float_state_dict",
]
