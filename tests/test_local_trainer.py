"""Built-in trainer: atomic checkpoints, resume from the right iteration, QAT from an FP checkpoint."""
import os

import pytest
import torch

from qgait_plugin.checkpoint import read_checkpoint
from qgait_plugin.config import ConfigError
from qgait_plugin.local.config import build_config
from qgait_plugin.local.fixtures import write_random_dataset
from qgait_plugin.local.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    part = write_random_dataset(str(root), subjects=8, train=4, views=("000", "090"), frames=6, val=2)
    return str(root), part


def _cfg(data, out, **trainer):
    root, part = data
    t = {"output_root": str(out), "total_iter": 4, "save_iter": 2, "save_name": "run",
         "sampler": {"batch_size": [2, 2], "frames_num_fixed": 3}}
    t.update(trainer)
    quant = t.pop("quant", None)
    d = {"data_cfg": {"dataset_root": root, "dataset_partition": part, "resolution": [16, 11], "cache": False},
         "model_cfg": {"channels": [4, 8], "layers": [1, 1], "strides": [1, 2], "bin_num": [4],
                       "SeparateFCs": {"out_channels": 8}, "SeparateBNNecks": {"class_num": 4}},
         "trainer_cfg": t}
    if quant:
        d["quant"] = quant
    return build_config(d)


def test_checkpoints_and_resume_match_uninterrupted_run(data, tmp_path):
    full = Trainer(_cfg(data, tmp_path / "a"), progress=False)
    res = full.train()
    ck_dir = tmp_path / "a" / "SynthGait" / "GaitBaseLite" / "run" / "checkpoints"
    assert sorted(os.listdir(ck_dir)) == ["run-00002.pt", "run-00004.pt"]   # no temp files left behind
    ck = read_checkpoint(ck_dir / "run-00004.pt")  # weights_only: the trainer saves plain data
    assert {"model", "optimizer", "scheduler", "iteration"} <= set(ck) and ck["iteration"] == 4
    assert res["checkpoint"].endswith("run-00004.pt")

    # same run, stopped at iteration 2 and resumed from its checkpoint
    part1 = Trainer(_cfg(data, tmp_path / "b", total_iter=2), progress=False)
    part1.train()
    resumed = Trainer(_cfg(data, tmp_path / "b", restore_hint=2), progress=False)
    out = resumed.train()
    assert [h["iteration"] for h in out["history"]] == [1, 2, 3, 4]
    assert [h["loss"] for h in out["history"]] == pytest.approx([h["loss"] for h in res["history"]], rel=1e-4)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_qat_from_fp_checkpoint_with_idd(data, tmp_path):
    fp = Trainer(_cfg(data, tmp_path, total_iter=2, save_name="fp"), progress=False).train()
    q = {"weight": {"bits": 4}, "act": {"bits": 4}, "init_from": fp["checkpoint"],
         "schedule": {"ste_iters": 2, "soft_iters": 2, "lr_scale": 0.1}, "idd": {"enabled": True}}
    tr = Trainer(_cfg(data, tmp_path, total_iter=4, save_name="q", quant=q), progress=False)
    lr0 = tr.cfg["optimizer_cfg"]["lr"]
    out = tr.train()
    assert all("idd" in h for h in out["history"])
    assert out["history"][-1]["lr"] == pytest.approx(lr0 * 0.1)      # lr scaled once at the switch
    ck = read_checkpoint(out["checkpoint"])
    assert "schedule" in ck
    assert not any("teacher" in k for k in ck["model"])               # the teacher is not saved
    res = tr.evaluate()
    assert set(res["rank1"]) == {"NM", "BG", "CL", "mean"}
    # evaluating from the checkpoint (qgait test) gives the same numbers
    again = Trainer(_cfg(data, tmp_path, total_iter=4, save_name="q", quant=q), progress=False).evaluate(restore=True)
    assert again["rank1"] == pytest.approx(res["rank1"])


def test_init_from_a_different_model_is_rejected(data, tmp_path):
    other = build_config({**{k: v for k, v in _cfg(data, tmp_path).items() if k != "quant"}})
    other["model_cfg"] = dict(other["model_cfg"], channels=[4, 4])
    fp = Trainer(other, progress=False)
    path = fp.save()
    q = {"weight": {"bits": 8}, "act": {"bits": 8}, "init_from": path}
    with pytest.raises(ConfigError, match="init_from"):
        Trainer(_cfg(data, tmp_path, save_name="bad", quant=q), progress=False).train()


def test_validation_curve_kd_and_idd_phase(data, tmp_path):
    """val_iter records VAL_SET results; KD acts every iteration; IDD with phase: soft only after the switch."""
    fp = Trainer(_cfg(data, tmp_path, total_iter=2, save_name="fp"), progress=False).train()
    q = {"weight": {"bits": 4}, "act": {"bits": 4}, "init_from": fp["checkpoint"],
         "schedule": {"ste_iters": 2, "soft_iters": 2, "lr_scale": 1.0}, "idd": {"phase": "soft", "weight": 2.0},
         "kd": {"weight": 3.0}, "step_lr_scale": 0.01}
    tr = Trainer(_cfg(data, tmp_path, total_iter=4, save_name="q", val_iter=2, quant=q), progress=False)
    out = tr.train()
    assert [v["iteration"] for v in out["val_history"]] == [2, 4]
    assert all("kd" in h for h in out["history"])
    assert ["idd" in h for h in out["history"]] == [False, False, True, True]
    assert tr.optimizer is not None
    groups = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}
    assert groups["quantizer_steps"] == pytest.approx(0.01 * groups["weights"])
    val = tr.evaluate(split="VAL_SET")
    test = tr.evaluate()
    assert set(val["ids"]) == {"005", "006"} and set(test["ids"]) == {"007", "008"}   # disjoint splits
    assert set(test["rank1_per_subject"]["NM"]) == {"007", "008"}
    # the validation curve survives a checkpoint round trip
    again = Trainer(_cfg(data, tmp_path, total_iter=4, save_name="q", val_iter=2, restore_hint=4, quant=q),
                    progress=False)
    again._setup_training()
    assert again.val_history == out["val_history"]


def test_soft_forward_only_while_training(data, tmp_path):
    """DSQ's soft forward is a training relaxation: in eval mode the model is the hard-rounded one."""
    fp = Trainer(_cfg(data, tmp_path, total_iter=1, save_name="fp2"), progress=False).train()
    q = {"weight": {"bits": 3}, "act": {"bits": 3}, "init_from": fp["checkpoint"],
         "schedule": {"ste_iters": 0, "soft_iters": 2, "soft": {"soft_forward": True}}}
    tr = Trainer(_cfg(data, tmp_path, total_iter=2, save_name="dsq", quant=q), progress=False)
    tr.train()
    from qgait_plugin.quant.convert import iter_quantizers

    x = torch.rand(2, 3, 16, 11)
    tr.model.eval()
    soft = tr.model(x)["embeddings"]
    for _, qz in iter_quantizers(tr.model):
        qz.soft_forward = False
    hard = tr.model(x)["embeddings"]
    assert torch.equal(soft, hard)
