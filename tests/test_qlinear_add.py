"""quant/qlinear_add.py computes a quantized add as onnxruntime's QLinearAdd does, value for value.

Every pair of uint8 inputs (65,536 of them) through a DequantizeLinear, DequantizeLinear -> Add ->
QuantizeLinear graph that onnxruntime fuses into QLinearAdd, against the emulation; the plain float
sum requantized (what eval computed before) differs at rounding ties, which the test also shows.
"""
import platform

import numpy as np
import pytest
import torch

from qgait_plugin.quant.qlinear_add import SIGNED_ZERO_POINT, qlinear_add_like_runtime
from qgait_plugin.quant.quantizer import LSQQuantizer

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                         reason="the emulated kernel is MLAS's x86 AVX2 one (ARM runs a fixed-point kernel)")


def _quantizer(bits: int, signed: bool, step: float) -> LSQQuantizer:
    q = LSQQuantizer(bits, "act", signed=signed)
    q.set_step(torch.tensor(step))
    return q


def _qdq_add_model(path: str, sa: float, za: int, sb: float, zb: int, sc: float, zc: int) -> None:
    from onnx import TensorProto, helper

    def const(name, value, dtype):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))

    nodes = [const("sa", sa, TensorProto.FLOAT), const("za", za, TensorProto.UINT8),
             const("sb", sb, TensorProto.FLOAT), const("zb", zb, TensorProto.UINT8),
             const("sc", sc, TensorProto.FLOAT), const("zc", zc, TensorProto.UINT8),
             helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node("Add", ["fa", "fb"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "sc", "zc"], ["c"])]
    shape = [256, 256]
    graph = helper.make_graph(nodes, "qadd", [helper.make_tensor_value_info("a", TensorProto.UINT8, shape),
                                              helper.make_tensor_value_info("b", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("c", TensorProto.UINT8, shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


@x86
@pytest.mark.parametrize("signs, steps", [((True, False, False), None), ((True, True, True), None),
                                          ((False, False, False), None),
                                          # steps in ratios 1:1:2: exact ties, which the float sum breaks by an ulp
                                          ((False, False, False), (0.05, 0.05, 0.1)),
                                          ((True, False, True), (0.05, 0.05, 0.1))])
def test_every_uint8_pair_matches_onnxruntimes_qlinearadd(tmp_path, signs, steps):
    from qgait_plugin.export.runtime import cpu_session, optimized_graph_ops, run_session

    g = torch.Generator().manual_seed(sum(signs))
    steps = steps or (0.02 + 0.1 * torch.rand(3, generator=g)).tolist()
    qa, qb, qc = (_quantizer(8, s, st) for s, st in zip(signs, steps))
    zps = [SIGNED_ZERO_POINT if s else 0 for s in signs]
    path = str(tmp_path / "qadd.onnx")
    _qdq_add_model(path, float(qa.effective_step()), zps[0], float(qb.effective_step()), zps[1],
                   float(qc.effective_step()), zps[2])
    assert optimized_graph_ops(path).get("com.microsoft:QLinearAdd") == 1  # the fused kernel runs

    a8, b8 = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    got = run_session(cpu_session(path, 1), a8.to(torch.uint8).numpy(), b8.to(torch.uint8).numpy())[0]
    a = (a8 - zps[0]).float() * qa.effective_step()  # the grid values PyTorch's eval holds
    b = (b8 - zps[1]).float() * qb.effective_step()
    emulated = qlinear_add_like_runtime(a, b, qa, qb, qc)
    # the exporter writes a Clip to the grid after the Q (a signed 8-bit grid stops at -127, its container at -128)
    want = (torch.from_numpy(got.astype(np.int64)) - zps[2]).clamp(*qc.qrange_now())
    assert torch.equal(torch.round(emulated / qc.effective_step()).long(), want)
    # the float sum requantized, as eval computed it before, misses some of these where the steps make ties
    plain = torch.round(((a + b) / qc.effective_step()).clamp(*qc.qrange_now())).long()
    print("float sum differs at", int((plain != want).sum()), "of 65536 pairs")
    if steps == (0.05, 0.05, 0.1):
        assert (plain != want).any()


def test_grids_below_8_bits_clip_after_the_add():
    qa, qb, qc = _quantizer(4, False, 0.1), _quantizer(4, False, 0.1), _quantizer(4, False, 0.1)
    a = torch.tensor([1.5, 0.0, 0.7])
    b = torch.tensor([1.5, 0.0, 0.2])
    out = qlinear_add_like_runtime(a, b, qa, qb, qc)
    assert torch.allclose(out, torch.tensor([1.5, 0.0, 0.9]))  # 30 steps clipped to the 4-bit top (15)
