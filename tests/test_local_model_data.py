"""Built-in host: model shapes, the P x K sampler, the cutting transform and config checking."""
import numpy as np
import pytest
import torch

from qgait_plugin.config import ConfigError
from qgait_plugin.local.config import build_config, load_config
from qgait_plugin.local.data import TripletSampler, collate_fixed, cut_and_resize, load_split
from qgait_plugin.local.fixtures import write_random_dataset
from qgait_plugin.local.model import GaitBaseLite, build_model, register_quant_handlers


def test_forward_shapes_follow_config():
    m = build_model({"channels": [4, 8, 16], "layers": [1, 2, 1], "strides": [1, 2, 1], "bin_num": [8, 4],
                     "SeparateFCs": {"out_channels": 12}, "SeparateBNNecks": {"class_num": 7}})
    out = m(torch.rand(3, 5, 16, 12))
    assert out["embeddings"].shape == (3, 12, 12)   # [n, out_channels, parts = 8 + 4]
    assert out["logits"].shape == (3, 7, 12)
    m.eval()
    one = m(torch.rand(1, 9, 16, 12))               # any number of frames at test time
    assert one["embeddings"].shape == (1, 12, 12)


def test_quantized_model_keeps_names_and_shapes():
    from qgait_plugin.quant.convert import iter_quantizers, quantize_model

    register_quant_handlers()
    m = GaitBaseLite((4, 8), (1, 1), (1, 2), (4,), 8, 5)
    keys = set(m.state_dict())
    quantize_model(m, {"weight": {"bits": 4}, "act": {"bits": 4}})
    names = [n for n, _ in iter_quantizers(m)]
    assert any(n.startswith("FCs.") for n in names) and any(n.startswith("BNNecks.") for n in names)
    assert keys <= set(m.state_dict())
    assert m(torch.rand(2, 3, 16, 12))["embeddings"].shape == (2, 8, 4)


def test_cutting_transform_and_downsample():
    frames = np.zeros((3, 64, 64), np.uint8)
    frames[:, :, 10:54] = 255                        # exactly the 44 kept columns
    assert cut_and_resize(frames).shape == (3, 64, 44)
    assert cut_and_resize(frames).min() == 255
    small = cut_and_resize(frames, (32, 22))
    assert small.shape == (3, 32, 22) and small.dtype == torch.uint8 and small.min() == 255


def test_sampler_gives_p_ids_times_k_sequences(tmp_path):
    part = write_random_dataset(str(tmp_path), subjects=5, train=5, views=("000",), types=("nm-01", "nm-02", "bg-01"))
    seqs = load_split({"dataset_root": str(tmp_path), "dataset_partition": part, "resolution": [16, 11]},
                      "TRAIN_SET", progress=False)
    s = TripletSampler(seqs, p=3, k=4, seed=1)      # K=4 > 3 sequences per id: drawn with replacement
    for _ in range(5):
        batch = s.sample()
        sids = [seqs[i].sid for i in batch]
        assert len(batch) == 12
        assert len(set(sids)) == 3
        assert all(sids[j * 4:(j + 1) * 4] == [sids[j * 4]] * 4 for j in range(3))  # grouped by id
    import random
    x, y = collate_fixed(seqs, batch, 6, random.Random(0), {s: i for i, s in enumerate(sorted({q.sid for q in seqs}))})
    assert x.shape == (12, 6, 16, 11) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.tolist()[0] == y.tolist()[3]


def test_sampler_needs_p_ids(tmp_path):
    part = write_random_dataset(str(tmp_path), subjects=2, train=2, views=("000",), types=("nm-01",))
    seqs = load_split({"dataset_root": str(tmp_path), "dataset_partition": part, "resolution": [16, 11]},
                      "TRAIN_SET", progress=False)
    with pytest.raises(ConfigError, match="P=3"):
        TripletSampler(seqs, 3, 2)


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer_cfg:\n  total_itr: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: trainer_cfg.total_itr: unknown key"):
        load_config(str(p))
    p.write_text("trainer_cfg:\n  sampler: {batch_size: [4, 2], frames_num_fixd: 3}\n")
    with pytest.raises(ConfigError, match=r"trainer_cfg.sampler.frames_num_fixd"):
        load_config(str(p))
    p.write_text("quant:\n  weight: {bitz: 4}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*quant.weight.bitz"):
        load_config(str(p))


def test_opengait_keys_we_ignore_are_accepted_and_user_values_win():
    cfg = build_config({"trainer_cfg": {"enable_float16": True, "sync_BN": True, "total_iter": 7,
                                        "sampler": {"batch_size": [2, 2], "frames_num_max": 40}},
                        "model_cfg": {"channels": [8, 16], "layers": [1, 1], "strides": [1, 2]}})
    assert cfg["trainer_cfg"]["total_iter"] == 7
    assert cfg["trainer_cfg"]["sampler"]["frames_num_fixed"] == 12  # default kept under a partial override
    assert cfg["model_cfg"]["channels"] == [8, 16] and cfg["quant"] is None
    with pytest.raises(ConfigError, match="same length"):
        build_config({"model_cfg": {"channels": [8, 16]}})
