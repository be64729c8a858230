"""The one checkpoint reader: what it reads, and what it refuses with a message naming the file."""
import io
import os
import random

import pytest
import torch
from torch import nn

from qgait_plugin import (
    CheckpointError,
    ConfigError,
    QGaitError,
    load_float_state_dict,
    quantize_model,
    read_checkpoint,
)
from qgait_plugin.checkpoint import unwrap_state_dict, write_checkpoint

_RAN = []


def _run_code(tag):  # what an unsafe pickle would call on load
    _RAN.append(tag)
    return tag


class _Unsafe:
    def __reduce__(self):
        return (_run_code, ("executed",))


def test_reads_state_dicts_and_plain_run_state(tmp_path):
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 5])
    obj = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "iteration": 7,
           "rng": random.Random(1).getstate(), "history": [{"iteration": 1, "loss": 0.5}]}
    write_checkpoint(obj, str(tmp_path / "ck.pt"))
    ck = read_checkpoint(tmp_path / "ck.pt")
    assert ck["iteration"] == 7 and torch.equal(ck["model"]["weight"], net.weight)
    random.Random().setstate(ck["rng"])  # the python RNG state comes back usable
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_missing_file_names_the_file_and_the_setting(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=r"quant\.init_from: '.*nope\.pt' does not exist"):
        read_checkpoint(path, "quant.init_from")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)
    assert issubclass(CheckpointError, QGaitError)


def _truncated_checkpoint():
    buf = io.BytesIO()
    torch.save({"w": torch.ones(8)}, buf)
    return buf.getvalue()[:200]


# a text file makes torch.load raise IndexError, a cut zip RuntimeError, an empty file EOFError
@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", bytes(range(256)) * 4,
                                     b"this is not a checkpoint", b"a: 1\nb: [1, 2]\n", "truncated"])
def test_garbage_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(_truncated_checkpoint() if content == "truncated" else content)
    with pytest.raises(CheckpointError, match=r"garbage\.pt' is not a PyTorch checkpoint"):
        read_checkpoint(path)


def test_a_non_dict_is_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"t\.pt' holds a Tensor"):
        read_checkpoint(tmp_path / "t.pt")


def test_an_unsafe_pickle_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Unsafe()}, path)
    _RAN.clear()
    with pytest.raises(CheckpointError, match=r"evil\.pt' holds objects that are not tensors or plain data.*_run_code"):
        read_checkpoint(path)
    assert _RAN == []


def test_unwrap_and_load_float_state_dict_name_bad_keys():
    def net():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))

    fp = net()
    sd = fp.state_dict()
    for form in (sd, {"model": sd, "optimizer": {}}, {f"module.{k}": v for k, v in sd.items()}):
        assert unwrap_state_dict(form, set(sd)).keys() == sd.keys()
    q = quantize_model(net(), {"weight": {"bits": 4}})
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}
    loaded = load_float_state_dict(q, wrapped, source="quant.init_from: fp.pt")  # OpenGait + DDP layout
    assert torch.equal(q[0].weight, fp[0].weight) and "0.weight" in loaded  # only quantizer keys were missing
    partial = {k: v for k, v in sd.items() if not k.startswith("2.")}
    with pytest.raises(ConfigError, match=r"quant.init_from: fp.pt does not match Sequential: missing \['2.weight'"):
        load_float_state_dict(q, partial, source="quant.init_from: fp.pt")
    with pytest.raises(ConfigError, match="unexpected \\['extra'\\]"):
        load_float_state_dict(q, {**sd, "extra": torch.zeros(1)}, source="x")
    with pytest.raises(ConfigError, match="does not fit Sequential"):
        load_float_state_dict(q, {**sd, "0.weight": torch.zeros(3)}, source="x")


@pytest.mark.parametrize("torch_reader", [True, False], ids=["weights_only", "allowlist_unpickler"])
def test_both_restricted_readers_read_training_state_and_refuse_code(tmp_path, monkeypatch, torch_reader):
    """torch 1.13's weights-only unpickler cannot read a float, so there the reader runs its own
    allowlisting unpickler; both paths run on every torch (the second forced here)."""
    from collections import Counter

    from qgait_plugin import compat

    if torch_reader and not compat._weights_only_reads_plain_data():
        pytest.skip(f"torch {torch.__version__}'s weights-only unpickler cannot read a float")
    monkeypatch.setattr(compat, "_weights_only_reads_plain_data", lambda: torch_reader)
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 5])  # its state holds a Counter
    obj = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
           "loss": 0.25, "bits": {4, 8}, "blob": b"\x00\x01", "dtype": torch.bfloat16, "device": torch.device("cpu")}
    write_checkpoint(obj, str(tmp_path / "ck.pt"))
    ck = read_checkpoint(tmp_path / "ck.pt")
    assert ck["loss"] == 0.25 and ck["bits"] == {4, 8} and ck["blob"] == b"\x00\x01"
    assert ck["dtype"] is torch.bfloat16 and ck["scheduler"]["milestones"] == Counter([3, 5])
    assert torch.equal(ck["model"]["weight"], net.weight) and ck["optimizer"]["param_groups"][0]["lr"] == 0.5
    torch.save({"model": {}, "payload": _Unsafe()}, tmp_path / "evil.pt")
    _RAN.clear()
    with pytest.raises(CheckpointError, match=r"holds objects that are not tensors or plain data.*_run_code"):
        read_checkpoint(tmp_path / "evil.pt")
    assert _RAN == []
