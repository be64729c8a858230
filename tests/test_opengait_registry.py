"""register() against a stand-in of OpenGait's namespaces: the quant-aware classes, and the run
context through which the launcher learns the model and the test results (no OpenGait needed)."""
from types import SimpleNamespace

import torch
from torch import nn

from qgait_plugin.opengait.idd_loss import IDD_LOSS_TYPE
from qgait_plugin.opengait.registry import register
from qgait_plugin.opengait.run_context import RunContext


class _Log:
    def __init__(self):
        self.lines = []

    def log_info(self, msg):
        self.lines.append(msg)

    log_warning = log_info


class BaseModel(nn.Module):
    """The part of OpenGait's BaseModel life cycle that register() relies on."""

    def __init__(self, cfgs, training):
        super().__init__()
        self.msg_mgr, self.cfgs, self.iteration = _Log(), cfgs, 0
        self.build_network(cfgs["model_cfg"])
        self.init_parameters()

    def build_network(self, model_cfg):
        pass

    def init_parameters(self):
        pass

    @staticmethod
    def run_test(model):
        return {"scalar/test_accuracy/NM": 0.5, "model": model}


class Tiny(BaseModel):
    """A model class as OpenGait's models package holds them."""

    def build_network(self, model_cfg):
        self.fc = nn.Linear(4, 2)


def _og():
    class BaseLoss(nn.Module):
        def __init__(self, loss_term_weight=1.0):
            super().__init__()
            self.info = {}

    models = SimpleNamespace(BaseModel=BaseModel, Tiny=Tiny)
    return SimpleNamespace(models=models, base_model=SimpleNamespace(BaseModel=BaseModel), losses=SimpleNamespace(),
                           losses_base=SimpleNamespace(BaseLoss=BaseLoss, gather_and_scale_wrapper=lambda f: f),
                           modules=SimpleNamespace(SeparateFCs=type("SeparateFCs", (nn.Module,), {}),
                                                   SeparateBNNecks=type("SeparateBNNecks", (nn.Module,), {})))


def test_register_wraps_models_and_reports_to_the_run_context():
    og = _og()
    ctx = RunContext(on_result=lambda model, result: seen.append((model, result)))
    seen = []
    assert register(og, context=ctx) == ["Tiny"]
    cls = og.models.Tiny
    assert cls is not Tiny and cls.__name__ == "Tiny" and cls._qgait_original is Tiny and issubclass(cls, Tiny)
    assert hasattr(og.losses, IDD_LOSS_TYPE)
    assert register(og, context=ctx) == ["Tiny"] and og.models.Tiny is cls  # idempotent

    model = cls({"model_cfg": {}}, training=False)  # no quant: section: runs as the original
    assert ctx.model is model and isinstance(model.fc, nn.Linear) and type(model.fc) is nn.Linear
    result = cls.run_test(model)
    assert ctx.results == [result] and seen == [(model, result)] and result["model"] is model

    register(og, context=None)  # the launcher's run is over: nobody listens any more
    cls.run_test(model)
    assert len(ctx.results) == 1


def test_quant_section_converts_the_network():
    og = _og()
    register(og)
    model = og.models.Tiny({"model_cfg": {}, "quant": {"weight": {"bits": 4}, "act": {"bits": 4}},
                            "trainer_cfg": {}}, training=False)
    assert any("qgait: quantized 1 layers of Tiny (W4A4" in line for line in model.msg_mgr.lines)
    assert model.fc.weight_quant.bits == 4 and model.qgait_state.config.weight.bits == 4
    assert "qgait_state._extra_state" in model.state_dict()
    assert torch.isfinite(model.fc.weight_quant(model.fc.weight)).all()
