"""`qgait export`: a trained QAT checkpoint of the built-in host out as the integer ONNX graph and a packed file."""
import os

import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")
from qgait_plugin.checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from qgait_plugin.cli import main  # noqa: E402
from qgait_plugin.export.outputs import ExportPathError  # noqa: E402
from qgait_plugin.export.packed import load_packed, save_packed  # noqa: E402
from qgait_plugin.local.config import build_config  # noqa: E402
from qgait_plugin.local.export_cmd import export_checkpoint  # noqa: E402
from qgait_plugin.local.fixtures import write_random_dataset  # noqa: E402
from qgait_plugin.local.model import build_model  # noqa: E402
from qgait_plugin.local.trainer import Trainer  # noqa: E402
from qgait_plugin.quant.convert import quantize_model  # noqa: E402


def _raw(root, part, out, save_name, total_iter, quant=None):
    d = {"data_cfg": {"dataset_root": root, "dataset_partition": part, "resolution": [16, 11], "cache": False},
         "model_cfg": {"channels": [4, 8], "layers": [1, 1], "strides": [1, 2], "bin_num": [4],
                       "SeparateFCs": {"out_channels": 8}, "SeparateBNNecks": {"class_num": 4}},
         "trainer_cfg": {"output_root": str(out), "total_iter": total_iter, "save_iter": total_iter,
                         "save_name": save_name, "sampler": {"batch_size": [2, 2], "frames_num_fixed": 3}}}
    if quant:
        d["quant"] = quant
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    root = tmp / "data"
    part = write_random_dataset(str(root), subjects=6, train=4, views=("000", "090"), frames=6)
    fp = Trainer(build_config(_raw(str(root), part, tmp, "fp", 2)), progress=False).train()
    q = {"weight": {"bits": 4}, "act": {"bits": 4}, "init_from": fp["checkpoint"],
         "schedule": {"ste_iters": 1, "soft_iters": 1}, "idd": {"enabled": True}}
    raw = _raw(str(root), part, tmp, "q", 2, quant=q)
    tr = Trainer(build_config(raw), progress=False).train()
    cfg_file = tmp / "q.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    return {"tmp": tmp, "raw": raw, "cfg": build_config(raw), "ckpt": tr["checkpoint"], "cfg_file": str(cfg_file),
            "root": str(root), "part": part}


def test_export_trained_qat_checkpoint(trained, tmp_path):
    cfg = trained["cfg"]
    res = export_checkpoint(cfg, str(tmp_path / "q.onnx"), packed=str(tmp_path / "q.qgpk"), runs=2, checks=4)
    assert res["integer_weights"] >= 5 and res["cosine_min"] >= 0.9999 and res["checked_sequences"] == 4
    assert res["problems"] == []
    assert res["packed_bytes"] > 0 and (tmp_path / "q.onnx").stat().st_size == res["onnx_bytes"]
    assert res["latency"]["int8"]["runs"] == 2 and res["speedup"] > 0
    assert res["optimized_ops"].get("com.microsoft:QLinearAdd", 0) >= 1
    # the packed file restores a model that computes the same embeddings as the checkpoint
    model = quantize_model(build_model(cfg["model_cfg"]), cfg["quant"])
    load_packed(model, str(tmp_path / "q.qgpk"), cfg["quant"]).eval()  # re-placed as the file's model
    tr = Trainer(cfg, progress=False)
    tr.restore(0, strict=True, save_name="q")
    x = (torch.rand(1, 5, 16, 11) > 0.5).float()
    assert torch.equal(model(x)["embeddings"], tr.model.eval()(x)["embeddings"])


def test_export_refuses_a_float_config(trained, tmp_path):
    fp_cfg = build_config(_raw(trained["root"], trained["part"], trained["tmp"], "fp", 2))
    with pytest.raises(ValueError, match="no quant: section"):
        export_checkpoint(fp_cfg, str(tmp_path / "fp.onnx"))


def test_bad_output_paths_are_refused_and_nothing_is_written(trained, tmp_path):
    cfg = trained["cfg"]
    ckpt = trained["ckpt"]
    before = open(ckpt, "rb").read()
    with pytest.raises(ExportPathError, match="checkpoint being read"):
        export_checkpoint(cfg, ckpt, runs=0, force=True)
    with pytest.raises(ExportPathError, match="checkpoint being read"):
        export_checkpoint(cfg, str(tmp_path / "a.onnx"), packed=ckpt, runs=0, force=True)
    assert open(ckpt, "rb").read() == before
    with pytest.raises(ExportPathError, match="same file"):
        export_checkpoint(cfg, str(tmp_path / "a.onnx"), packed=str(tmp_path / "a.onnx"), runs=0)
    with pytest.raises(ExportPathError, match="is a folder"):
        export_checkpoint(cfg, str(tmp_path), runs=0)
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(ExportPathError, match="--force"):
        export_checkpoint(cfg, str(existing), runs=0)
    assert existing.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["old.onnx"]  # no temporary left behind
    export_checkpoint(cfg, str(existing), runs=0, force=True, checks=1)
    assert existing.read_bytes()[:7] != b"keep me"


def test_checkpoint_that_does_not_fit_the_config_is_a_clear_error(trained, tmp_path):
    raw = dict(trained["raw"])
    raw["quant"] = {**raw["quant"], "weight": {"bits": 8}, "act": {"bits": 8}}  # trained at 4 bits
    with pytest.raises(ValueError, match="does not fit the configured model"):
        export_checkpoint(build_config(raw), str(tmp_path / "q.onnx"), runs=0)
    assert not (tmp_path / "q.onnx").exists()


def test_cli_prints_one_line_and_exits_2(trained, tmp_path, capsys):
    existing = tmp_path / "x.onnx"
    existing.write_bytes(b"x")
    assert main(["export", "--cfgs", trained["cfg_file"], "--out", str(existing), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qgait export: --out") and "--force" in err
    assert main(["export", "--cfgs", trained["cfg_file"], "--out", str(tmp_path / "y.onnx"), "--runs", "1",
                 "--check", "2"]) == 0
    out = capsys.readouterr().out
    assert "cosine min" in out and "QLinearConv" in out and "x smaller than FP32" in out


# ------------------------------------------------------------------------------------------------
# issue 18: damaged files refused, unwritable outputs and failed steps leave nothing behind


def _flip_bit_in_member(path, member_suffix, tmp_path):
    """A copy of the zip archive ``path`` with one bit flipped in the middle of the member ending in
    ``member_suffix`` (a tensor's storage, or the pickle); returns the copy and the member's name."""
    import shutil
    import struct
    import zipfile

    copy = tmp_path / ("damaged" + os.path.splitext(str(path))[1])
    shutil.copy(path, copy)
    with zipfile.ZipFile(copy) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(member_suffix)), key=lambda i: i.file_size)
    data = bytearray(copy.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x08
    copy.write_bytes(bytes(data))
    return copy, info.filename


def test_a_flipped_bit_in_a_qat_checkpoint_is_refused_naming_the_member(trained, tmp_path, capsys):
    damaged, member = _flip_bit_in_member(trained["ckpt"], "data/0", tmp_path)
    raw = dict(trained["raw"])
    raw["evaluator_cfg"] = {"restore_hint": str(damaged), "sampler": {"frames_all_limit": 4}}
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    assert main(["test", "--cfgs", str(cfg_file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qgait test: evaluator_cfg.restore_hint: '{damaged}' is damaged: member '{member}'")
    assert "fails its CRC check" in err and err.count("\n") == 1
    damaged, member = _flip_bit_in_member(trained["ckpt"], "data.pkl", tmp_path)  # the structure, not a tensor
    with pytest.raises(CheckpointError, match=f"member '{member}' \\(the pickled structure\\)"):
        read_checkpoint(str(damaged))


def test_a_flipped_bit_in_a_packed_file_is_refused(trained, tmp_path):
    cfg = trained["cfg"]
    tr = Trainer(cfg, progress=False)
    tr.restore(0, strict=True, save_name="q")
    save_packed(tr.model, str(tmp_path / "q.qgpk"))
    damaged, member = _flip_bit_in_member(tmp_path / "q.qgpk", "data/0", tmp_path)
    model = quantize_model(build_model(cfg["model_cfg"]), cfg["quant"])
    with pytest.raises(CheckpointError, match=f"packed file: '{damaged}' is damaged: member '{member}'"):
        load_packed(model, str(damaged))


def test_a_qat_checkpoint_as_init_from_is_refused(trained, tmp_path, capsys):
    raw = dict(trained["raw"])
    raw["quant"] = {**raw["quant"], "init_from": trained["ckpt"]}  # the same bits: it would load
    raw["trainer_cfg"] = {**raw["trainer_cfg"], "output_root": str(tmp_path), "save_name": "again"}
    cfg_file = tmp_path / "again.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    assert main(["train", "--cfgs", str(cfg_file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds quantizer state" in err and "it is a QAT checkpoint, not a full-precision one" in err


def test_unwritable_packed_is_refused_before_the_onnx_is_written(trained, tmp_path, capsys):
    assert main(["export", "--cfgs", trained["cfg_file"], "--out", str(tmp_path / "q.onnx"), "--threads", "-3"]) == 2
    assert capsys.readouterr().err.startswith("qgait export: --threads: -3")
    (tmp_path / "file").write_text("x")
    assert main(["export", "--cfgs", trained["cfg_file"], "--out", str(tmp_path / "q.onnx"), "--packed",
                 str(tmp_path / "file" / "q.qgpk"), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qgait export: --packed") and "is a file, not a folder" in err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_failed_packed_write_takes_the_new_onnx_with_it(trained, tmp_path, capsys, monkeypatch):
    import errno

    import qgait_plugin.export.packed as packed

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packed.torch, "save", full)
    args = ["export", "--cfgs", trained["cfg_file"], "--out", str(tmp_path / "q.onnx"), "--packed",
            str(tmp_path / "q.qgpk"), "--runs", "1", "--check", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("qgait export: cannot write") and "No space left on device" in err
    assert os.listdir(tmp_path) == []  # no ONNX left: the rerun needs no --force
    monkeypatch.undo()
    assert main(args) == 0
