"""ONNX export: integer weights in the file, and onnxruntime computes what the fake-quantized model computes."""

import pytest
import torch
from torch import nn

from qgait_plugin import LSQQuantizer, quantize_model
from qgait_plugin.quant.convert import iter_quantizers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from qgait_plugin.export.onnx_export import export_onnx  # noqa: E402


def small_net():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_onnx_matches_fake_quant_and_stores_integers(tmp_path, bits):
    torch.manual_seed(0)
    model = quantize_model(small_net(), {"weight": {"bits": bits}, "act": {"bits": bits}})
    x = (torch.rand(4, 1, 32, 22) > 0.5).float()
    model.train()(x)
    with torch.no_grad():  # push a weight past its grid: the export must clamp it like training does
        model[3].weight[0, 0, 0, 0] = 50.0
    model.eval()
    ref = model(x).detach()
    info = export_onnx(model, (x,), str(tmp_path / "m.onnx"))
    assert info["integer_weights"] == 3
    m = onnx.load(info["path"])
    int_inits = [i for i in m.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    assert len(int_inits) == 3
    qmax = 2 ** (bits - 1) - 1
    for init in int_inits:
        vals = onnx.numpy_helper.to_array(init)
        assert vals.min() >= -qmax and vals.max() <= qmax  # weights stay on their own (narrower) grid
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4 for i in m.graph.initializer)
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-5, rtol=1e-4)
    out2 = sess.run(None, {"input": torch.cat([x, x]).numpy()})[0]  # dynamic batch
    assert out2.shape == (8, 10)
    assert all(type(q) is LSQQuantizer for _, q in iter_quantizers(model))  # export swapped them back
    assert model[3].weight[0, 0, 0, 0].item() == 50.0  # the model is left as it was


def test_uninitialised_model_cannot_export(tmp_path):
    model = quantize_model(small_net(), {})
    with pytest.raises(RuntimeError, match="never initialised"):
        export_onnx(model, (torch.rand(1, 1, 8, 8),), str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_checkpoint_round_trip_and_size(tmp_path, bits):
    import numpy as np

    from qgait_plugin import model_size_bytes
    from qgait_plugin.export.packed import load_packed, pack_bits, save_packed, unpack_bits

    vals = np.random.default_rng(0).integers(0, 2**bits, size=1001)
    assert np.array_equal(unpack_bits(pack_bits(vals, bits), bits, vals.size), vals)
    cfg = {"weight": {"bits": bits}, "act": {"bits": bits}}
    model = quantize_model(small_net(), cfg)
    x = (torch.rand(4, 1, 32, 22) > 0.5).float()
    model.train()(x)
    model.eval()
    ref = model(x)
    size = save_packed(model, str(tmp_path / "m.qgait"))
    fresh = quantize_model(small_net(), cfg)
    load_packed(fresh, str(tmp_path / "m.qgait")).eval()
    assert torch.equal(fresh(x), ref)
    blob = torch.load(str(tmp_path / "m.qgait"), weights_only=True)
    for entry in blob["layers"].values():  # each weight takes exactly ceil(numel * bits / 8) bytes
        numel = int(np.prod(entry["shape"]))
        assert entry["data"].numel() == (numel * bits + 7) // 8
    torch.save(small_net().state_dict(), str(tmp_path / "fp.pt"))
    assert size < (tmp_path / "fp.pt").stat().st_size
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert model_size_bytes(model) < weights * 4  # smaller than the float weights alone
    with pytest.raises(ValueError, match="bit"):
        load_packed(quantize_model(small_net(), {"weight": {"bits": 5 if bits != 5 else 6}}), str(tmp_path / "m.qgait"))
