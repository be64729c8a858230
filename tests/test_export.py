"""ONNX export: the integer graph reproduces the fake-quantized model and runs in integer kernels.

A small trained-ish GaitBaseLite (BatchNorm statistics and quantizer steps from binary frames) at
8, 4 and 3 bits, residual quantizers on and off; onnxruntime's optimized graph
(``SessionOptions.optimized_model_filepath``) must hold integer ops for every quantized conv, add
and per-part FC and no float Conv; the graph passes are checked one by one.
"""
import copy

import numpy as np
import pytest
import torch
from conftest import INT8_EXACT, w8_cosine_floor
from torch import nn

from qgait_plugin import quantize_model
from qgait_plugin.compat import load_weights_only
from qgait_plugin.local.model import GaitBaseLite, register_quant_handlers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qgait_plugin.export import passes  # noqa: E402
from qgait_plugin.export.deploy import IO_NAMES, float_copy  # noqa: E402
from qgait_plugin.export.onnx_export import _trace, export_onnx  # noqa: E402
from qgait_plugin.export.qdq import EXACT_INPUT_SCALE, export_mode  # noqa: E402
from qgait_plugin.export.runtime import cpu_session, optimized_graph_ops, run_session  # noqa: E402
from qgait_plugin.local.export_cmd import EmbeddingHead  # noqa: E402
from qgait_plugin.quant.convert import iter_quantizers  # noqa: E402


def sils(n, frames=6, h=32, w=22, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, frames, h, w, generator=g) > 0.5).float()


def trained_ish(bits, residual=True, channels=(8, 16, 32)):
    """GaitBaseLite with BatchNorm statistics from binary frames, quantized and calibrated like after QAT."""
    register_quant_handlers()
    torch.manual_seed(0)
    fp = GaitBaseLite(channels, (1, 1, 1), (1, 2, 1), (16,), 16, 8)
    bns = [m for m in fp.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
    with torch.no_grad():
        for s in range(3):
            fp.train()(sils(4, seed=10 + s))
    q = quantize_model(copy.deepcopy(fp), {"weight": {"bits": bits}, "act": {"bits": bits},
                                           "residual": {"enabled": residual}})
    with torch.no_grad():
        q.train()(sils(4, seed=20))
    return EmbeddingHead(q).eval()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("residual", [True, False])
def test_onnx_reproduces_the_fake_quantized_model(tmp_path, bits, residual):
    head = trained_ish(bits, residual)
    x = sils(5, seed=1)
    with torch.no_grad():
        ref = head(x)
    info = export_onnx(head, (x[:1],), str(tmp_path / "m.onnx"), **IO_NAMES)
    out = torch.from_numpy(run_session(cpu_session(info["path"], 1), x.numpy())[0])  # dynamic batch
    assert _cos(out, ref).min() >= w8_cosine_floor(bits)
    assert all(type(q).__name__ == "LSQQuantizer" for _, q in iter_quantizers(head))  # export swapped them back
    qmax = 2 ** (bits - 1) - 1
    m = onnx.load(info["path"])
    # int8, or uint8 with zero point 128 (convs reading the exact input; every weight on CPUs without VNNI)
    small = {onnx.TensorProto.INT8: 0, onnx.TensorProto.UINT8: 128}
    ints = [onnx.numpy_helper.to_array(i).astype(np.int16) - small[i.data_type] for i in m.graph.initializer
            if i.data_type in small]
    weights = [a for a in ints if a.ndim >= 2]
    assert len(weights) == info["integer_weights"] == 10  # 9 convs and the per-part FC
    assert all(a.min() >= -qmax and a.max() <= qmax for a in weights)  # each on its own (narrower) grid
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4 for i in m.graph.initializer)
    if residual:
        assert info["problems"] == []
    else:  # the adds and the convs before them stay float: the check says so
        assert any("Add" in p for p in info["problems"]) or any("no QuantizeLinear" in p for p in info["problems"])


def test_optimized_graph_runs_every_quantized_op_in_integer_kernels(tmp_path):
    head = trained_ish(8)
    x = sils(1)
    path = str(tmp_path / "q.onnx")
    info = export_onnx(head, (x,), path, **IO_NAMES)
    before = info["ops"]
    opt_file = str(tmp_path / "optimized.onnx")
    cpu_session(path, 1, optimized_model=opt_file)  # SessionOptions.optimized_model_filepath, ORT_ENABLE_ALL
    after = passes.op_counts(onnx.load(opt_file).graph.node)
    assert after == optimized_graph_ops(path)
    assert before["Conv"] == 9 and before["Add"] == 4 and before["MatMul"] == 1
    assert after.get("QLinearConv", 0) + after.get("com.microsoft:QLinearConv", 0) == 9
    assert after["com.microsoft:QLinearAdd"] == 3  # the three residual adds (HPP's mean + max stays float)
    assert after["com.microsoft:MatMulIntegerToFloat"] == 1
    assert not any(k.split(":")[-1] in ("Conv", "FusedConv", "MatMul", "BatchNormalization") for k in after), after
    # the float model of the same network has no integer op at all
    fp_path = str(tmp_path / "fp.onnx")
    from qgait_plugin.export.onnx_export import export_float_onnx

    export_float_onnx(float_copy(head), (x,), fp_path, **IO_NAMES)
    fp_opt = optimized_graph_ops(fp_path)
    assert not any("QLinear" in k or "Integer" in k for k in fp_opt)


def _raw_graph(head, x, path):
    with export_mode(head):
        _trace(head, (x,), path, 17, ["in"], ["out"], None)
    return onnx.load(path)


def _run(model, x):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"in": x.numpy()})[0]


def test_batchnorm_folding_equals_the_unfolded_graph_and_biases_are_int32(tmp_path):
    head = trained_ish(4)
    with torch.no_grad():  # a negative gamma somewhere: the fold must negate that channel's integers
        head.model.Backbone.layers[0][0].bn1.weight[0] = -0.7
    x = sils(1)
    m = _raw_graph(head, x, str(tmp_path / "raw.onnx"))
    passes.constants_to_initializers(m)
    unfolded = _run(m, x)
    n_bn = sum(1 for n in m.graph.node if n.op_type == "BatchNormalization")
    assert passes.fold_batchnorm(m) == n_bn == 9
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    np.testing.assert_allclose(_run(m, x), unfolded, rtol=1e-4, atol=1e-5)
    assert passes.int32_biases(m) == 9
    gr = passes.Graph(m)
    for conv in (n for n in m.graph.node if n.op_type == "Conv"):
        dq = gr.producer[conv.input[2]]
        q, scale = gr.value(dq.input[0]), gr.value(dq.input[1])
        assert dq.op_type == "DequantizeLinear" and q.dtype == np.int32
        w_scale = gr.value(gr.producer[conv.input[1]].input[1])
        x_scale = passes._input_scale(gr, conv.input[0])
        np.testing.assert_array_equal(scale, (np.float32(x_scale) * w_scale).astype(np.float32))  # s_x * s_w
        assert gr.value(gr.producer[conv.input[1]].input[0]).dtype == np.int8


def test_sub_8_bit_grids_are_clipped_on_the_integer_tensor(tmp_path):
    head = trained_ish(3)
    info = export_onnx(head, (sils(1),), str(tmp_path / "m.onnx"), **IO_NAMES)
    m = onnx.load(info["path"])
    gr = passes.Graph(m)
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    assert clips
    for c in clips:  # Q -> Clip(uint8) -> DQ, never a float Clip in front of a Q
        assert gr.producer[c.input[0]].op_type == "QuantizeLinear"
        assert all(gr.value(i).dtype == np.uint8 for i in c.input[1:])
        assert gr.only_consumer(c.output[0]).op_type == "DequantizeLinear"
    bounds = {(int(gr.value(c.input[1])), int(gr.value(c.input[2]))) for c in clips}
    assert (0, 7) in bounds  # unsigned 3-bit inputs
    assert (1, 255) in bounds  # 8-bit signed residual grids: [-127, 127] around zero point 128


def test_first_layer_input_is_exact_in_uint8():
    """The loaders feed uint8 / 255; Q(scale 1/255, zp 0) gives back the integer exactly."""
    from onnx import TensorProto, helper, numpy_helper

    k = np.arange(256, dtype=np.uint8)
    x = torch.from_numpy(k).float().div(255.0).numpy()  # as local/data.py and OpenGait's transform do
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                           helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                          [helper.make_tensor_value_info("q", TensorProto.UINT8, [256]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])],
                          [numpy_helper.from_array(np.array(EXACT_INPUT_SCALE, np.float32), "s"),
                           numpy_helper.from_array(np.array(0, np.uint8), "z")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q, y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(q, k)
    assert np.abs(y - x).max() <= np.spacing(np.float32(1.0))  # within one float ulp of the input
    assert y[0] == 0.0 and y[255] == 1.0  # binary silhouettes: exactly 0 and 1


@pytest.mark.slow
def test_same_rank1_as_pytorch_on_a_generated_test_set(tmp_path):
    from qgait_plugin.local.config import build_config
    from qgait_plugin.local.data import load_split
    from qgait_plugin.local.deploy import runtime_rank1
    from qgait_plugin.local.evaluate import extract_embeddings
    from qgait_plugin.protocol import casia_b_protocol
    from qgait_plugin.synth import generate_dataset

    part = generate_dataset(tmp_path / "data", subjects=4, frames=6, views=(0, 90), progress=False)
    cfg = build_config({"data_cfg": {"dataset_root": str(tmp_path / "data"), "dataset_partition": str(part),
                                     "resolution": [32, 22]},
                        "evaluator_cfg": {"sampler": {"frames_all_limit": 6}}})
    test = load_split(cfg["data_cfg"], "TEST_SET") or load_split(cfg["data_cfg"], "TRAIN_SET")
    for bits in (8, 4, 3) if INT8_EXACT else (4, 3):  # W8 on AVX2-only CPUs: tests/conftest.py
        head = trained_ish(bits)
        path = str(tmp_path / f"m{bits}.onnx")
        export_onnx(head, (sils(1),), path, **IO_NAMES)
        emb = extract_embeddings(head.model, test, torch.device("cpu"), 6, progress=False)
        ref = casia_b_protocol(emb, [s.sid for s in test], [s.type for s in test], [s.view for s in test])
        got = runtime_rank1(path, cfg, test)
        assert got["rank1"] == ref["rank1"]  # mAP may move by a near-tie in the ranking
        assert got["mAP"] == pytest.approx(ref["mAP"], abs=0.5)


def test_uninitialised_model_cannot_export(tmp_path):
    register_quant_handlers()
    model = EmbeddingHead(quantize_model(GaitBaseLite((4, 8), (1, 1), (1, 2), (4,), 8, 4), {}))
    with pytest.raises(RuntimeError, match="never initialised"):
        export_onnx(model, (sils(1, 2, 16, 11),), str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_checkpoint_round_trip_and_size(tmp_path, bits):
    from qgait_plugin import model_size_bytes
    from qgait_plugin.export.packed import load_packed, pack_bits, save_packed, unpack_bits

    vals = np.random.default_rng(0).integers(0, 2**bits, size=1001)
    assert np.array_equal(unpack_bits(pack_bits(vals, bits), bits, vals.size), vals)
    cfg = {"weight": {"bits": bits}, "act": {"bits": bits}}

    def small_net():
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(32, 10))

    model = quantize_model(small_net(), cfg)
    x = (torch.rand(4, 1, 32, 22) > 0.5).float()
    model.train()(x)
    model.eval()
    ref = model(x)
    size = save_packed(model, str(tmp_path / "m.qgpk"))
    fresh = quantize_model(small_net(), cfg)
    load_packed(fresh, str(tmp_path / "m.qgpk")).eval()
    assert torch.equal(fresh(x), ref)
    blob = load_weights_only(str(tmp_path / "m.qgpk"))
    for entry in blob["layers"].values():  # each weight takes exactly ceil(numel * bits / 8) bytes
        numel = int(np.prod(entry["shape"]))
        assert entry["data"].numel() == (numel * bits + 7) // 8
    torch.save(small_net().state_dict(), str(tmp_path / "fp.pt"))
    assert size < (tmp_path / "fp.pt").stat().st_size
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert model_size_bytes(model) < weights * 4
    with pytest.raises(ValueError, match="bit"):
        load_packed(quantize_model(small_net(), {"weight": {"bits": 5 if bits != 5 else 6}}), str(tmp_path / "m.qgpk"))
