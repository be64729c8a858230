"""The built-in host places quantizers from the model's dataflow, and still reads checkpoints placed by
the block registry (written before dataflow placement): test, export and resume rebuild the placement
the checkpoint records."""
import pytest
import torch

from qgait_plugin.checkpoint import read_checkpoint
from qgait_plugin.local.config import build_config
from qgait_plugin.local.fixtures import write_random_dataset
from qgait_plugin.local.trainer import Trainer
from qgait_plugin.quant.convert import REGISTRY, checkpoint_placement, model_placement
from qgait_plugin.quant.placement import ATTR, Plan

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    part = write_random_dataset(str(root), subjects=8, train=4, views=("000", "090"), frames=6, val=2)
    return str(root), part


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("out")


def _cfg(data, out, save_name, quant=None, **trainer):
    root, part = data
    t = {"output_root": str(out), "total_iter": 2, "save_iter": 2, "save_name": save_name,
         "sampler": {"batch_size": [2, 2], "frames_num_fixed": 3}}
    t.update(trainer)
    d = {"data_cfg": {"dataset_root": root, "dataset_partition": part, "resolution": [32, 22], "cache": False},
         "model_cfg": {"channels": [8, 16, 32], "layers": [1, 1, 1], "strides": [1, 2, 1], "bin_num": [4],
                       "SeparateFCs": {"out_channels": 8}, "SeparateBNNecks": {"class_num": 4}},
         "evaluator_cfg": {"restore_hint": 2, "save_name": save_name},
         "trainer_cfg": t}
    if quant:
        d["quant"] = quant
    return build_config(d)


@pytest.fixture(scope="module")
def fp(data, out):
    return Trainer(_cfg(data, out, "fp"), progress=False).train()["checkpoint"]


def _quant(fp, placement=None, bits=8):
    q = {"weight": {"bits": bits}, "act": {"bits": bits}, "init_from": fp}
    if placement:
        q["residual"] = {"placement": placement}
    return q


def _export(cfg, path):
    from qgait_plugin.local.export_cmd import export_checkpoint

    return export_checkpoint(cfg, str(path), runs=0, force=True, checks=2)


def test_new_runs_place_from_the_dataflow_and_test_and_export_rebuild_it(data, out, fp, tmp_path):
    cfg = _cfg(data, out, "df", _quant(fp))
    tr = Trainer(cfg, progress=False)
    assert isinstance(model_placement(tr.model), Plan)
    res = tr.train()
    sd = read_checkpoint(res["checkpoint"])["model"]
    assert isinstance(checkpoint_placement(sd), Plan) and f"{ATTR}._extra_state" in sd
    ref = tr.evaluate()
    again = Trainer(cfg, progress=False)
    assert again.evaluate(restore=True)["rank1"] == pytest.approx(ref["rank1"])
    assert not again._requantized  # the same plan: nothing rebuilt
    exp = _export(cfg, tmp_path / "df.onnx")
    opt = exp["optimized_ops"]
    assert not any(k.split(":")[-1] in ("Conv", "FusedConv", "MatMul") for k in opt), opt
    assert exp["problems"] == [] and exp["cosine_min"] >= 0.999
    # what stays float is listed with a reason: the HPP mean and the per-part FC's scale, nothing heavy
    floats = {f["op"]: f["reason"] for f in exp["float_ops"]}
    assert set(floats) <= {"ReduceMean", "Mul", "Add"}, floats
    assert all(floats.values())


def test_a_checkpoint_placed_by_the_registry_still_tests_exports_and_resumes(data, out, fp, tmp_path):
    old_cfg = _cfg(data, out, "reg", _quant(fp, "registry"))  # what main wrote: no placement plan stored
    old = Trainer(old_cfg, progress=False)
    res = old.train()
    sd = read_checkpoint(res["checkpoint"])["model"]
    assert checkpoint_placement(sd) == REGISTRY and f"{ATTR}._extra_state" not in sd
    ref = old.evaluate()
    # today's config (dataflow placement by default) reads it: the model is rebuilt with the registry
    cfg = _cfg(data, out, "reg", _quant(fp))
    tr = Trainer(cfg, progress=False)
    assert isinstance(model_placement(tr.model), Plan)
    assert tr.evaluate(restore=True)["rank1"] == pytest.approx(ref["rank1"])
    assert tr._requantized and model_placement(tr.model) == REGISTRY
    for (k, a), b in zip(old.model.state_dict().items(), tr.model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    exp = _export(cfg, tmp_path / "reg.onnx")
    assert exp["cosine_min"] >= 0.999
    # resuming the old run keeps its placement (the optimizer is built over the right quantizers)
    more = Trainer(_cfg(data, out, "reg", _quant(fp), total_iter=3, restore_hint=2), progress=False).train()
    assert checkpoint_placement(read_checkpoint(more["checkpoint"])["model"]) == REGISTRY


def test_placement_key_is_validated():
    from qgait_plugin.config import ConfigError, QuantConfig

    assert QuantConfig.from_dict({}).residual.placement == "dataflow"
    with pytest.raises(ConfigError, match=r"quant.residual.placement: 'blocks'.*\['dataflow', 'registry'\]"):
        QuantConfig.from_dict({"residual": {"placement": "blocks"}})
