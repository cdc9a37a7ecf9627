"""The sharded encoder cache: resumes at the first missing shard, gathers like numpy, keeps its
storage dtype in the key."""

import json

import numpy as np
import pytest

from fashion_sd.training.shards import ShardedArray, shard_folder, sharded

KEY = {"version": 1, "kind": "images", "weights": "w", "items": ["a"]}


def rows_of(data, calls):
    def compute(start, stop):
        calls.append((start, stop))
        return data[start:stop]
    return compute


def test_gathers_like_numpy(tmp_path):
    data = np.random.default_rng(0).normal(size=(23, 2, 3, 4)).astype(np.float32)
    calls = []
    a = sharded(tmp_path, KEY, 23, rows_of(data, calls), rows_per_shard=5)
    assert calls == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert a.shape == data.shape and len(a) == 23 and a.dtype == np.float32
    rows = np.array([22, 0, 7, 7, 13, -1])
    flips = np.array([1, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(a[rows], data[rows])
    np.testing.assert_array_equal(a[rows, flips], data[rows, flips])
    np.testing.assert_array_equal(a[4], data[4])
    np.testing.assert_array_equal(np.asarray(a), data)
    with pytest.raises(IndexError):
        a[np.array([23])]
    again = sharded(tmp_path, KEY, 23, rows_of(data, calls), rows_per_shard=5)
    assert len(calls) == 5 and np.array_equal(np.asarray(again), data)  # a hit computes nothing


def test_an_interrupted_encoding_resumes_at_the_first_missing_shard(tmp_path, capsys):
    data = np.arange(40, dtype=np.float32).reshape(20, 2)
    calls = []

    def dies_at_third(start, stop):
        if start == 8:
            raise KeyboardInterrupt("runtime disconnected")
        return rows_of(data, calls)(start, stop)

    with pytest.raises(KeyboardInterrupt):
        sharded(tmp_path, KEY, 20, dies_at_third, rows_per_shard=4)
    folder = shard_folder(tmp_path, {**KEY, "store_dtype": "float32", "rows_per_shard": 4})
    assert sorted(p.name for p in folder.glob("shard-*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    assert not (folder / "index.json").exists()
    calls.clear()
    a = sharded(tmp_path, KEY, 20, rows_of(data, calls), rows_per_shard=4)
    assert calls == [(8, 12), (12, 16), (16, 20)]  # nothing encoded twice
    assert "2 of 5 shards already encoded" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(a), data)


def test_a_damaged_shard_is_encoded_again(tmp_path):
    data = np.ones((6, 3), np.float32)
    sharded(tmp_path, KEY, 6, rows_of(data, []), rows_per_shard=2)
    folder = shard_folder(tmp_path, {**KEY, "store_dtype": "float32", "rows_per_shard": 2})
    (folder / "index.json").unlink()
    (folder / "shard-00001.npy").write_bytes(b"junk")
    calls = []
    a = sharded(tmp_path, KEY, 6, rows_of(data, calls), rows_per_shard=2)
    assert calls == [(2, 4)] and np.array_equal(np.asarray(a), data)


def test_float16_storage_has_its_own_key_and_serves_float32(tmp_path):
    data = np.random.default_rng(1).normal(size=(9, 4)).astype(np.float32)
    a32 = sharded(tmp_path, KEY, 9, rows_of(data, []), rows_per_shard=4)
    a16 = sharded(tmp_path, KEY, 9, rows_of(data, []), store_dtype="float16", rows_per_shard=4)
    assert a16.folder != a32.folder and a16.stored_dtype == "float16"
    got = np.asarray(a16)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, data, rtol=2 ** -11, atol=1e-7)  # float16's half-ulp
    assert json.loads((a16.folder / "key.json").read_text())["store_dtype"] == "float16"


def test_a_folder_made_for_another_key_is_rebuilt(tmp_path):
    data = np.zeros((3, 2), np.float32)
    a = sharded(tmp_path, KEY, 3, rows_of(data, []), rows_per_shard=2)
    (a.folder / "key.json").write_text(json.dumps({"kind": "other"}))
    calls = []
    b = sharded(tmp_path, KEY, 3, rows_of(data + 1, calls), rows_per_shard=2)
    assert calls == [(0, 2), (2, 3)] and np.array_equal(np.asarray(b), data + 1)
    assert isinstance(b, ShardedArray)
