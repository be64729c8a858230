"""OpenGait's on-disk layout: sequence files, the safe reader, listing, the partition file."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from qgait_plugin.errors import QGaitError
from qgait_plugin.layout import (
    CASIA_B_TYPES,
    GALLERY_TYPES,
    PROBE_TYPES,
    DataError,
    list_sequences,
    read_partition,
    read_sequence,
    sequence_path,
    write_partition,
    write_sequence,
)


def test_casia_b_names():
    assert len(CASIA_B_TYPES) == 10 and CASIA_B_TYPES[0] == "nm-01" and CASIA_B_TYPES[-1] == "cl-02"
    probes = [t for ts in PROBE_TYPES.values() for t in ts]
    assert sorted(GALLERY_TYPES + tuple(probes)) == sorted(CASIA_B_TYPES)  # every type has one role


def test_sequence_round_trip_and_path(tmp_path):
    frames = (np.arange(3 * 4 * 5) % 256).astype(np.uint8).reshape(3, 4, 5)
    path = write_sequence(tmp_path, "001", "nm-01", "090", frames)
    assert path == sequence_path(tmp_path, "001", "nm-01", "090") == tmp_path / "001" / "nm-01" / "090" / "090.pkl"
    assert os.listdir(path.parent) == ["090.pkl"]  # no temporary file left behind
    got = read_sequence(path)
    assert got.dtype == np.uint8 and np.array_equal(got, frames)
    with open(path, "rb") as f:  # OpenGait reads it with plain pickle.load
        assert np.array_equal(pickle.load(f), frames)
    with pytest.raises(DataError, match="uint8"):
        write_sequence(tmp_path, "001", "nm-01", "000", frames.astype(np.float32))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_reader_takes_arrays_of_every_pickle_protocol(tmp_path, protocol):
    frames = np.random.default_rng(0).integers(0, 256, (4, 8, 8)).astype(np.uint8)
    p = tmp_path / "seq.pkl"
    p.write_bytes(pickle.dumps(frames, protocol=protocol))
    assert np.array_equal(read_sequence(p), frames)
    if protocol == 2:  # written by numpy 1, whose module was numpy.core (OpenGait's data sets predate numpy 2)
        p.write_bytes(p.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        assert np.array_equal(read_sequence(p), frames)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_reader_refuses_anything_but_arrays(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(DataError, match=r"evil\.pkl: .*refusing global (posix|os|nt)\.system"):
        read_sequence(evil)
    other = tmp_path / "dict.pkl"
    other.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DataError, match=r"dict\.pkl: holds a dict"):
        read_sequence(other)
    flat = tmp_path / "flat.pkl"
    flat.write_bytes(pickle.dumps(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DataError, match=r"flat\.pkl: holds shape \(4, 4\)"):
        read_sequence(flat)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="junk.pkl: not a pickled numpy array"):
        read_sequence(tmp_path / "junk.pkl")
    assert issubclass(DataError, QGaitError) and issubclass(DataError, ValueError)


def test_reader_takes_what_the_generator_writes(tmp_path):
    from qgait_plugin.synth import generate_dataset

    part = generate_dataset(tmp_path, subjects=2, frames=4, views=(0, 90), types=("nm-01", "cl-01"), progress=False)
    ids = read_partition(part)["TRAIN_SET"] + read_partition(part)["TEST_SET"]
    files = list_sequences(tmp_path, ids)
    assert [(f.sid, f.type, f.view) for f in files][:2] == [("001", "cl-01", "000"), ("001", "cl-01", "090")]
    assert len(files) == 2 * 2 * 2
    for f in files:
        with open(f.path, "rb") as fh:
            assert np.array_equal(read_sequence(f.path), pickle.load(fh))


def test_listing_skips_what_is_not_a_sequence(tmp_path):
    frames = np.full((2, 4, 4), 255, np.uint8)
    write_sequence(tmp_path, "002", "nm-01", "000", frames)
    write_sequence(tmp_path, "001", "bg-01", "018", frames)
    (tmp_path / "001" / "bg-01" / "036").mkdir()                      # an empty view directory
    (tmp_path / "001" / "bg-01" / "018" / ".tmp-x.pkl").write_bytes(b"")  # a write in progress
    (tmp_path / "001" / "notes.txt").write_text("x")                   # a stray file
    files = list_sequences(tmp_path, ["002", "001"])
    assert [(f.sid, f.type, f.view, f.path.name) for f in files] == [("001", "bg-01", "018", "018.pkl"),
                                                                     ("002", "nm-01", "000", "000.pkl")]
    with pytest.raises(DataError, match=r"1 of 3 ids listed in p\.json have no sequence files under it: \['003'\]"):
        list_sequences(tmp_path, ["002", "001", "003"], partition="p.json")  # 003 has no directory
    assert len(list_sequences(tmp_path, ["002", "001", "003"], missing_ok=True)) == 2
    with pytest.raises(DataError, match="not a directory"):
        list_sequences(tmp_path / "missing", ["001"])


def test_partition_keeps_other_keys(tmp_path):
    path = write_partition(tmp_path / "partition.json", ["001", "002"], ["003"], extra={"PROBE_SET": ["003"]})
    assert json.loads(path.read_text()) == {"TRAIN_SET": ["001", "002"], "TEST_SET": ["003"], "PROBE_SET": ["003"]}
    path.write_text(json.dumps({"TRAIN_SET": [1, 2], "TEST_SET": ["003"], "VAL_SET": [4], "note": "kept"}))
    assert read_partition(path) == {"TRAIN_SET": ["1", "2"], "TEST_SET": ["003"], "VAL_SET": ["4"], "note": "kept"}


def test_partition_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.json"
    with pytest.raises(DataError, match=r"p\.json: partition file not found"):
        read_partition(bad)
    bad.write_text("{")
    with pytest.raises(DataError, match=r"p\.json: not valid JSON"):
        read_partition(bad)
    bad.write_text(json.dumps({"TRAIN_SET": ["001"]}))
    with pytest.raises(DataError, match=r"p\.json: expected a list under 'TEST_SET'"):
        read_partition(bad)
