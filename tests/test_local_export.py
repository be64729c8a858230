"""`qgait export`: a trained QAT checkpoint of the built-in host out as ONNX and as a packed file."""
import pytest
import torch

pytest.importorskip("onnxruntime")
from qgait_plugin.export.packed import load_packed  # noqa: E402
from qgait_plugin.local.config import build_config  # noqa: E402
from qgait_plugin.local.export_cmd import export_checkpoint  # noqa: E402
from qgait_plugin.local.fixtures import write_random_dataset  # noqa: E402
from qgait_plugin.local.model import build_model  # noqa: E402
from qgait_plugin.local.trainer import Trainer  # noqa: E402
from qgait_plugin.quant.convert import quantize_model  # noqa: E402


def _cfg(root, part, out, save_name, total_iter, quant=None):
    d = {"data_cfg": {"dataset_root": root, "dataset_partition": part, "resolution": [16, 11], "cache": False},
         "model_cfg": {"channels": [4, 8], "layers": [1, 1], "strides": [1, 2], "bin_num": [4],
                       "SeparateFCs": {"out_channels": 8}, "SeparateBNNecks": {"class_num": 4}},
         "trainer_cfg": {"output_root": str(out), "total_iter": total_iter, "save_iter": total_iter,
                         "save_name": save_name, "sampler": {"batch_size": [2, 2], "frames_num_fixed": 3}}}
    if quant:
        d["quant"] = quant
    return build_config(d)


def test_export_trained_qat_checkpoint(tmp_path):
    root = tmp_path / "data"
    part = write_random_dataset(str(root), subjects=6, train=4, views=("000", "090"), frames=6)
    fp = Trainer(_cfg(str(root), part, tmp_path, "fp", 2), progress=False).train()
    q = {"weight": {"bits": 4}, "act": {"bits": 4}, "init_from": fp["checkpoint"],
         "schedule": {"ste_iters": 1, "soft_iters": 1}, "idd": {"enabled": True}}
    cfg = _cfg(str(root), part, tmp_path, "q", 2, quant=q)
    Trainer(cfg, progress=False).train()
    res = export_checkpoint(cfg, str(tmp_path / "q.onnx"), packed=str(tmp_path / "q.qgait"), runs=2)
    assert res["integer_weights"] >= 3 and res["max_rel_diff_vs_torch"] < 1e-4
    assert res["packed_bytes"] > 0 and (tmp_path / "q.onnx").stat().st_size == res["onnx_bytes"]
    # the packed file restores a model that computes the same embeddings as the checkpoint
    model = quantize_model(build_model(cfg["model_cfg"]), cfg["quant"])
    load_packed(model, str(tmp_path / "q.qgait")).eval()
    tr = Trainer(cfg, progress=False)
    tr.restore(0, strict=True, save_name="q")
    x = torch.rand(1, 5, 16, 11)
    assert torch.equal(model(x)["embeddings"], tr.model.eval()(x)["embeddings"])
    with pytest.raises(ValueError, match="no quant: section"):
        export_checkpoint(_cfg(str(root), part, tmp_path, "fp", 2), str(tmp_path / "fp.onnx"))
