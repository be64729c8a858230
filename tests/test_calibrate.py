"""Post-training quantization: the core calibration (statistics, estimators, BN, objectives) and `qgait calibrate`."""
import os

import pytest
import torch
import yaml
from torch import nn

from qgait_plugin.calibrate import calibrate_model, collect_and_set_steps, estimate_step, recon_blocks
from qgait_plugin.calibrate.stats import ActStats
from qgait_plugin.cli import main
from qgait_plugin.compat import load_weights_only
from qgait_plugin.config import CalibrateConfig, QuantConfig
from qgait_plugin.errors import ConfigError
from qgait_plugin.local.calibrate_cmd import calibrate_checkpoint
from qgait_plugin.local.config import build_config
from qgait_plugin.local.fixtures import write_random_dataset
from qgait_plugin.local.model import build_model, register_quant_handlers
from qgait_plugin.local.trainer import Trainer
from qgait_plugin.quant.convert import iter_quantizers, quantize_model
from qgait_plugin.teacher import make_teacher

# --------------------------------------------------------------------------------------------
# config


def test_calibrate_section_is_validated_with_names_and_hints():
    q = QuantConfig.from_dict({"calibrate": {"samples": 64, "estimator": "percentile", "objective": "idc"}})
    assert q.calibrate == CalibrateConfig(samples=64, estimator="percentile", objective="idc")
    assert QuantConfig.from_dict(q.to_dict()) == q
    with pytest.raises(ConfigError, match=r"quant.calibrate.estimatr: unknown key \(did you mean 'estimator'"):
        QuantConfig.from_dict({"calibrate": {"estimatr": "mse"}})
    with pytest.raises(ConfigError, match=r"quant.calibrate.bn: 'refit' is not allowed; choose one of"):
        QuantConfig.from_dict({"calibrate": {"bn": "refit"}})
    with pytest.raises(ConfigError, match=r"quant.calibrate.samples: expected int, got str"):
        QuantConfig.from_dict({"calibrate": {"samples": "64"}})
    with pytest.raises(ConfigError, match=r"quant.calibrate.samples: 0 must be >= 1"):
        QuantConfig.from_dict({"calibrate": {"samples": 0}})
    with pytest.raises(ConfigError, match=r"quant.calibrate.percentile: 40"):
        QuantConfig.from_dict({"calibrate": {"percentile": 40}})


# --------------------------------------------------------------------------------------------
# estimators


def test_estimators_order_and_outliers():
    torch.manual_seed(0)
    st = ActStats()
    x = torch.randn(100000).abs()
    x[0] = 100.0  # one outlier
    st.update(x, per_batch=1 << 20)
    mm = float(estimate_step(st, 8, False, "minmax"))
    pc = float(estimate_step(st, 8, False, "percentile", 99.0))
    mse = float(estimate_step(st, 4, False, "mse"))
    assert mm == pytest.approx(100.0 / 255)
    assert pc == pytest.approx(float(torch.quantile(x, 0.99)) / 255, rel=1e-3)
    # the MSE-optimal clip ignores the single outlier at 4 bits
    assert mse * 15 < 10
    with pytest.raises(ValueError):
        estimate_step(st, 8, False, "max")


def _tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 6))
    net.eval()
    return net


def test_statistics_come_from_every_batch_not_the_first():
    net = quantize_model(_tiny_net(), {"weight": {"bits": 8}, "act": {"bits": 8}})
    small = torch.rand(4, 1, 8, 8) * 0.1
    big = torch.rand(4, 1, 8, 8) * 10
    info = collect_and_set_steps(net, [small, big], lambda m, b: m(b), "minmax")
    assert info["weights"] == 3 and info["activations"] == 2 and info["unused"] == []
    quants = dict(iter_quantizers(net))
    # the second conv's input saw the large batch: its step covers it
    with torch.no_grad():
        ref = _tiny_net()
        ref.load_state_dict({k: v for k, v in net.state_dict().items() if "quant" not in k}, strict=False)
        h = ref[2](ref[1](ref[0](torch.cat([small, big])))).abs().max()
    a1 = quants["3.act_quant"]
    assert a1.signed is False and float(a1.effective_step()) == pytest.approx(float(h) / 255, rel=1e-5)
    for q in quants.values():
        if q.enabled:
            assert bool(q.initialized)


def test_bn_reestimation_changes_running_stats_and_keep_does_not():
    base = _tiny_net()
    x = [torch.rand(8, 1, 8, 8) for _ in range(3)]
    for bn_mode in ("keep", "reestimate"):
        net = quantize_model(_tiny_net(), {"weight": {"bits": 4}, "act": {"bits": 4}})
        cfg = CalibrateConfig(bn=bn_mode)
        calibrate_model(net, x, QuantConfig(), forward=lambda m, b: m(b), embed=lambda o: o,
                        labels=lambda b: torch.zeros(len(b)), cfg=cfg)
        same = torch.equal(net[1].running_mean, base[1].running_mean)
        assert same == (bn_mode == "keep")
        assert not net.training


class _EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _tiny_net()

    def forward(self, x):
        e = self.body(x)
        return {"embeddings": e.reshape(len(x), 6, 1)}


@pytest.mark.parametrize("objective,lr", [("idc", 3e-2), ("kd", 1e-2), ("recon", 1e-2), ("task", 3e-2)])
def test_objectives_train_only_steps_and_lower_their_loss(objective, lr):
    torch.manual_seed(0)
    fp = _EmbNet().eval()
    fp_state = {k: v.clone() for k, v in fp.state_dict().items()}
    net = quantize_model(_EmbNet(), {"weight": {"bits": 3}, "act": {"bits": 3}})
    net.load_state_dict(fp_state, strict=False)
    teacher = make_teacher(net, fp_state)
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():  # labels the FP net gets right, so the task loss measures what quantization lost
        y = fp(x)["embeddings"][:, :, 0].argmax(1)
    batches = [(x, y)]  # one batch: the loss curve is comparable
    cfg = CalibrateConfig(objective=objective, iters=60, lr=lr)
    weights_before = {k: v.clone() for k, v in net.state_dict().items() if "quant" not in k}
    grads_before = [p.requires_grad for p in net.parameters()]

    def task(out, b):
        return nn.functional.cross_entropy(20 * out["embeddings"][:, :, 0], b[1])

    info = calibrate_model(net, batches, QuantConfig(), forward=lambda m, b: m(b[0]), embed=lambda o: o["embeddings"],
                           labels=lambda b: b[1], teacher=teacher, task_loss=task, cfg=cfg)
    assert info["loss_last"] < info["loss_first"]
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())  # weights and BN untouched
    assert [p.requires_grad for p in net.parameters()] == grads_before  # unfrozen again
    assert info["seconds"]["objective"] > 0


@pytest.mark.parametrize("objective", ["idc", "recon"])
def test_teacher_runs_once_per_batch_and_the_cache_changes_nothing(objective, monkeypatch):
    """The frozen teacher's outputs on each calibration batch are computed once and reused: the same
    loss curve and steps as running the teacher on every iteration, with one teacher pass per batch."""
    import qgait_plugin.calibrate.objectives as objectives

    batches = [(torch.rand(16, 1, 8, 8), torch.arange(16) % 6) for _ in range(3)]
    results = []
    for budget in (objectives.TEACHER_CACHE_BYTES, 0):  # 0: too large to cache, the teacher runs every time
        monkeypatch.setattr(objectives, "TEACHER_CACHE_BYTES", budget)
        torch.manual_seed(0)
        fp = _EmbNet().eval()
        fp_state = {k: v.clone() for k, v in fp.state_dict().items()}
        net = quantize_model(_EmbNet(), {"weight": {"bits": 3}, "act": {"bits": 3}})
        net.load_state_dict(fp_state, strict=False)
        collect_and_set_steps(net, batches, lambda m, b: m(b[0]))
        teacher = make_teacher(net, fp_state)
        calls: list = []
        teacher.module.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        res = objectives.train_steps(net, teacher, batches, objective, 12, 1e-2, lambda m, b: m(b[0]),
                                     lambda o: o["embeddings"], lambda b: b[1])
        steps = {n: q.effective_step().clone() for n, q in iter_quantizers(net) if q.enabled}
        results.append((res["loss"], steps, len(calls)))
    (loss_c, steps_c, calls_c), (loss_u, steps_u, calls_u) = results
    assert calls_c == len(batches) and calls_u == 12
    assert loss_c == loss_u
    assert all(torch.equal(steps_c[n], steps_u[n]) for n in steps_u)


def test_recon_blocks_are_blocks_and_layers_outside_them():
    register_quant_handlers()
    m = quantize_model(build_model({"channels": [4, 8], "layers": [1, 1], "strides": [1, 2], "bin_num": [4],
                                    "SeparateFCs": {"out_channels": 8}, "SeparateBNNecks": {"class_num": 4}}),
                       {"weight": {"bits": 4}, "act": {"bits": 4}})
    names = recon_blocks(m)
    assert names == ["Backbone.conv1", "Backbone.layers.0.0", "Backbone.layers.1.0", "FCs", "BNNecks"]


# --------------------------------------------------------------------------------------------
# qgait calibrate (built-in host)


def _raw(root, part, out, save_name, total_iter=2, quant=None):
    d = {"data_cfg": {"dataset_root": root, "dataset_partition": part, "resolution": [16, 11], "cache": False},
         "model_cfg": {"channels": [4, 8], "layers": [1, 1], "strides": [1, 2], "bin_num": [4],
                       "SeparateFCs": {"out_channels": 8}, "SeparateBNNecks": {"class_num": 4}},
         "trainer_cfg": {"output_root": str(out), "total_iter": total_iter, "save_iter": total_iter,
                         "save_name": save_name, "sampler": {"batch_size": [2, 2], "frames_num_fixed": 3}},
         "evaluator_cfg": {"sampler": {"frames_all_limit": 4}}}
    if quant:
        d["quant"] = quant
    return d


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    root = tmp / "data"
    part = write_random_dataset(str(root), subjects=6, train=4, views=("000", "090"), frames=6)
    fp = Trainer(build_config(_raw(str(root), part, tmp, "fp")), progress=False).train()
    return {"tmp": tmp, "root": str(root), "part": part, "fp": fp["checkpoint"]}


def _write_cfg(fp_run, name, quant):
    raw = _raw(fp_run["root"], fp_run["part"], fp_run["tmp"], name, quant=quant)
    path = fp_run["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), raw


def test_calibrate_command_writes_a_checkpoint_test_and_qat_read(fp_run, capsys):
    cfg_file, raw = _write_cfg(fp_run, "ptq4", {"weight": {"bits": 4}, "act": {"bits": 4}, "init_from": fp_run["fp"],
                                                "calibrate": {"samples": 16, "batch": 8, "objective": "kd",
                                                              "iters": 5}})
    assert main(["calibrate", "--cfgs", cfg_file, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wall time" in out and "objective kd" in out
    ck = fp_run["tmp"] / "SynthGait" / "GaitBaseLite" / "ptq4" / "checkpoints" / "ptq4-00000.pt"
    assert ck.is_file()
    saved = load_weights_only(ck)
    assert saved["iteration"] == 0 and saved["calibration"]["objective"] == "kd"
    # qgait test reads it with the same config
    assert main(["test", "--cfgs", cfg_file, "--no-progress"]) == 0
    assert "rank-1 NM" in capsys.readouterr().out
    # the steps it set are the ones a Trainer restores
    tr = Trainer(build_config(raw), progress=False)
    tr.restore(0, save_name="ptq4")
    assert all(bool(q.initialized) for _, q in iter_quantizers(tr.model) if q.enabled)
    # quant.init_from must be the FP checkpoint (the teacher is built from it): the PTQ file is refused there
    q = dict(raw["quant"], init_from=str(ck), schedule={"ste_iters": 1})
    with pytest.raises(ConfigError, match="not a full-precision one"):
        Trainer(build_config(_raw(fp_run["root"], fp_run["part"], fp_run["tmp"], "qat_from_ptq", 1, q)),
                progress=False)._setup_training()
    # QAT continues from it as a restore_hint file, with the calibrated steps
    q2 = dict(raw["quant"], schedule={"ste_iters": 1})
    raw2 = _raw(fp_run["root"], fp_run["part"], fp_run["tmp"], "resume_ptq", 1, q2)
    raw2["trainer_cfg"]["restore_hint"] = str(ck)
    assert Trainer(build_config(raw2), progress=False).train()["iteration"] == 1


def test_calibrate_export_reads_it(fp_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from qgait_plugin.local.export_cmd import export_checkpoint

    _, raw = _write_cfg(fp_run, "ptq8", {"init_from": fp_run["fp"], "calibrate": {"samples": 8}})
    calibrate_checkpoint(build_config(raw), progress=False)
    res = export_checkpoint(build_config(raw), str(tmp_path / "p.onnx"), runs=1, checks=2)
    assert res["problems"] == [] and res["cosine_min"] >= 0.999


def _nothing_written(fp_run, name):
    return not (fp_run["tmp"] / "SynthGait" / "GaitBaseLite" / name).exists()


def test_calibrate_bad_input_one_line_errors_nothing_written(fp_run, capsys):
    cases = [
        ("no_init", {"calibrate": {"samples": 8}}, "quant.init_from: calibration starts from a full-precision"),
        ("too_many", {"init_from": fp_run["fp"], "calibrate": {"samples": 10000}},
         "quant.calibrate.samples: 10000, but the training set"),
    ]
    for name, quant, msg in cases:
        cfg_file, _ = _write_cfg(fp_run, name, quant)
        assert main(["calibrate", "--cfgs", cfg_file, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert _nothing_written(fp_run, name)
    # a checkpoint of another model (wider channels)
    other = _raw(fp_run["root"], fp_run["part"], fp_run["tmp"], "other_fp")
    other["model_cfg"]["channels"] = [8, 8]
    wide = Trainer(build_config(other), progress=False).train()["checkpoint"]
    cfg_file, _ = _write_cfg(fp_run, "wrong_model", {"init_from": wide, "calibrate": {"samples": 8}})
    assert main(["calibrate", "--cfgs", cfg_file, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit GaitBaseLite" in err or "does not match GaitBaseLite" in err, err
    assert _nothing_written(fp_run, "wrong_model")
    # no quant: section at all
    cfg_file, _ = _write_cfg(fp_run, "no_quant", None)
    assert main(["calibrate", "--cfgs", cfg_file, "--no-progress"]) == 2
    assert "has no quant: section" in capsys.readouterr().err
    assert not os.path.exists(fp_run["tmp"] / "SynthGait" / "GaitBaseLite" / "no_quant" / "checkpoints")
