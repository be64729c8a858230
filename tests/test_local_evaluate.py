"""The CASIA-B protocol of the built-in host, checked on cases small enough to compute by hand."""
import pytest
import torch

from qgait_plugin.local.evaluate import casia_b_protocol, distance


def _emb(values):
    """1-D embeddings as [n, c=1, p=1]."""
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)


def test_rank1_per_condition_hand_computed():
    # 3 ids, views 000 and 090, gallery nm-01 at value 10*id in both views.
    ids, types, views, vals = [], [], [], []

    def add(i, t, v, x):
        ids.append(str(i))
        types.append(t)
        views.append(v)
        vals.append(x)

    for i in range(3):
        for v in ("000", "090"):
            add(i, "nm-01", v, 10.0 * i)
    for i in range(3):
        for v in ("000", "090"):
            add(i, "nm-05", v, 10.0 * i + 1)                      # NM: every probe nearest its own id
            # BG: id 0 seen at 000 sits on id 1's gallery -> 1 of 3 wrong at probe view 000
            add(i, "bg-01", v, 10.0 if (i == 0 and v == "000") else 10.0 * i + 1)
            # CL: every probe at 000 sits on the next id's gallery -> all wrong at 000, all right at 090
            add(i, "cl-01", v, 10.0 * ((i + 1) % 3) if v == "000" else 10.0 * i + 1)
    res = casia_b_protocol(_emb(vals), ids, types, views)
    r = res["rank1"]
    assert r["NM"] == pytest.approx(100.0)
    assert r["BG"] == pytest.approx((200 / 3 + 100) / 2)           # view 000: 2/3, view 090: 3/3
    assert r["CL"] == pytest.approx(50.0)                          # view 000: 0, view 090: 1
    assert r["mean"] == pytest.approx((100 + (200 / 3 + 100) / 2 + 50) / 3)
    assert res["rank1_per_view"]["CL"] == {"000": pytest.approx(0.0), "090": pytest.approx(100.0)}
    assert "rank1_per_subject" not in res
    per = casia_b_protocol(_emb(vals), ids, types, views, per_subject=True)["rank1_per_subject"]
    assert per["BG"] == {"0": pytest.approx(50.0), "1": pytest.approx(100.0), "2": pytest.approx(100.0)}
    assert per["CL"] == {str(i): pytest.approx(50.0) for i in range(3)}
    for cond in ("NM", "BG", "CL"):   # a complete set: the subjects' mean is the condition's rank-1
        assert sum(per[cond].values()) / 3 == pytest.approx(r[cond])


def test_identical_views_are_excluded_and_map():
    # Each probe equals its own id's gallery at the same view, but across views its nearest
    # gallery sequence belongs to the other id: rank-1 is 0 (it would be 50 with identical views).
    ids = ["0", "1", "0", "1", "0", "1", "0", "1"]
    types = ["nm-01"] * 4 + ["nm-05"] * 4
    views = ["A", "A", "B", "B", "A", "A", "B", "B"]
    vals = [0, 100, 90, 10, 0, 100, 90, 10]
    res = casia_b_protocol(_emb(vals), ids, types, views)
    assert res["rank1"]["NM"] == pytest.approx(0.0)
    # the right id is always ranked second of two: AP 1/2
    assert res["mAP"] == pytest.approx(50.0)
    assert set(res["rank1"]) == {"NM", "mean"}  # no BG/CL probes present: those conditions are absent


def test_distance_is_part_averaged_euclidean():
    x = torch.randn(5, 3, 4)
    y = torch.randn(6, 3, 4)
    want = torch.stack([torch.cdist(x[:, :, p].double(), y[:, :, p].double()) for p in range(4)]).mean(0)
    assert torch.allclose(distance(x, y), want, atol=1e-9)


def test_no_gallery_raises():
    with pytest.raises(ValueError, match="no probe/gallery pairs"):
        casia_b_protocol(_emb([0, 1]), ["0", "1"], ["bg-01", "bg-01"], ["A", "B"])


def test_one_protocol_serves_the_evaluator_and_the_difficulty_probe():
    """The probe's rank-1 on plain ``[n, d]`` embeddings is the shared protocol's (Euclidean, one part)."""
    from qgait_plugin import protocol
    from qgait_plugin.local import evaluate
    from qgait_plugin.synth.difficulty import rank1

    assert evaluate.casia_b_protocol is protocol.casia_b_protocol and evaluate.distance is protocol.distance
    g = torch.Generator().manual_seed(0)
    info = [(f"{i:03d}", t, v) for i in range(5) for t in ("nm-01", "nm-02", "nm-05", "bg-01", "cl-01")
            for v in ("000", "090", "180")]
    emb = torch.randn(len(info), 6, generator=g) + torch.tensor([float(i[0]) for i in info])[:, None] * 0.5
    ids, types, views = zip(*info)
    want = protocol.casia_b_protocol(emb[:, :, None], ids, types, views)["rank1"]
    assert rank1(emb, info) == want
    # a condition without probes is NaN for the probe, and the mean is over the conditions present
    keep = [k for k, i in enumerate(info) if i[1] != "cl-01"]
    got = rank1(emb[keep], [info[k] for k in keep])
    assert got["CL"] != got["CL"] and got["mean"] == pytest.approx((got["NM"] + got["BG"]) / 2)
