"""Arrow shards without Ray: round trip, zero-copy reads, atomic publish, damage detection."""
import json

import numpy as np
import pytest
import torch

from ensemble_kd.storage.shards import (
    Shard,
    ShardCorruptError,
    ShardKey,
    ShardMismatchError,
    ShardSet,
    ShardWriter,
    check_manifest,
    emb_col,
    inspect,
)

R, D, C = 50, 6, 4


def key(teacher="t1", **kw):
    base = dict(teacher=teacher, checkpoint_sha256="c" * 64, dataset="toy", split="train", dataset_fingerprint="f" * 64,
                views={"num_views": 1}, embedding_dtype="float32")
    base.update(kw)
    return ShardKey(**base)


def rows(seed=0, n=R):
    g = np.random.default_rng(seed)
    return dict(sample_id=np.arange(n), label=np.arange(n) % C, view=np.zeros(n), aug_top=np.zeros(n), aug_left=np.zeros(n),
                aug_flip=np.zeros(n, bool), embedding=g.normal(size=(n, D)).astype(np.float32),
                logits=g.normal(size=(n, C)).astype(np.float32))


def write(root, k, data, rows_per_part=1000, chunk=17):
    with ShardWriter(root, k, D, C, rows_per_part) as w:
        for s in range(0, len(data["sample_id"]), chunk):
            w.write(**{n: v[s : s + chunk] for n, v in data.items()})
        w.close(num_samples=len(data["sample_id"]), dataset_name="toy")
    return root / k.dirname


def test_round_trip_and_zero_copy(tmp_path):
    data = rows()
    d = write(tmp_path, key(), data)
    s = Shard(d, verify=True)
    assert s.num_rows == R and s.teacher == "t1"
    np.testing.assert_array_equal(s.embeddings.numpy(), data["embedding"])
    np.testing.assert_array_equal(s.logits.numpy(), data["logits"])
    assert torch.equal(s.sample_ids, torch.arange(R))
    # zero-copy: the tensor's memory is the Arrow buffer of the memory-mapped file
    buf = s.table.column(emb_col("t1")).chunk(0).flatten().buffers()[1]
    assert s.embeddings.data_ptr() == buf.address
    assert s.table.column(emb_col("t1")).chunk(0).flatten().buffers()[1].is_cpu


def test_many_parts_and_float16(tmp_path):
    data = rows()
    d = write(tmp_path, key(embedding_dtype="float16"), data, rows_per_part=20)
    s = Shard(d)
    assert len(s.manifest["parts"]) == 3 and [p["rows"] for p in s.manifest["parts"]] == [20, 20, 10]
    assert s.embeddings.dtype == torch.float16
    np.testing.assert_allclose(s.embeddings.float().numpy(), data["embedding"], rtol=1e-3, atol=1e-3)


def test_same_key_same_id_and_different_key_different_id():
    assert key().shard_id == key().shard_id
    assert key().shard_id != key(checkpoint_sha256="d" * 64).shard_id
    assert key().shard_id != key(views={"num_views": 2}).shard_id


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, key(), D, C) as w:
            w.write(**rows(n=10))
            raise RuntimeError("actor died")
    assert list(tmp_path.iterdir()) == []


def test_wrong_shapes_rejected(tmp_path):
    bad = rows(n=5)
    bad["embedding"] = bad["embedding"][:, :3]
    with pytest.raises(ValueError, match=r"expected \(R, 6\)"):
        with ShardWriter(tmp_path, key(), D, C) as w:
            w.write(**bad)


def test_truncated_part_is_reported_with_its_path(tmp_path):
    d = write(tmp_path, key(), rows())
    part = d / "part-00000.arrow"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(ShardCorruptError, match=rf"{part}.*truncated"):
        Shard(d)


def test_corrupt_bytes_caught_on_open(tmp_path):
    d = write(tmp_path, key(), rows())
    part = d / "part-00000.arrow"
    b = bytearray(part.read_bytes())
    b[len(b) // 2] ^= 0xFF
    part.write_bytes(bytes(b))
    Shard(d, verify=False)  # same size, valid framing: only the checksum can tell
    with pytest.raises(ShardCorruptError, match=rf"{part} is damaged: its sha256"):
        Shard(d)  # verified on every open by default


def test_tampered_manifest_names_both_sides(tmp_path):
    k = key()
    d = write(tmp_path, k, rows())
    m = json.loads((d / "manifest.json").read_text())
    m["key"]["checkpoint_sha256"] = "e" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardMismatchError) as e:
        check_manifest(d, k)
    assert f"manifest has {'e' * 64!r}, this run expects {'c' * 64!r}" in str(e.value)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ShardCorruptError, match="manifest.json is unreadable"):
        Shard(d)


def test_shardset_joins_aligned_teachers_and_refuses_others(tmp_path):
    a = write(tmp_path, key("a"), rows(0))
    b = write(tmp_path, key("b"), rows(1))
    ss = ShardSet.open([a, b])
    assert ss.teachers == ["a", "b"] and len(ss) == R
    assert not torch.equal(ss.embeddings("a"), ss.embeddings("b"))
    other = rows(2)
    other["sample_id"] = other["sample_id"][::-1].copy()
    c = write(tmp_path, key("c"), other)
    with pytest.raises(ShardMismatchError, match="not row-aligned"):
        ShardSet.open([a, c])
    d = write(tmp_path, key("d", dataset_fingerprint="0" * 64), rows(3))
    with pytest.raises(ShardMismatchError, match="different datasets"):
        ShardSet.open([a, d])


def test_inspect_summarises(tmp_path):
    write(tmp_path, key("a"), rows())
    write(tmp_path, key("b", split="test"), rows(n=7))
    (tmp_path / ".b__test__x.tmp-1234").mkdir()  # an unfinished write is not a shard
    info = inspect(tmp_path)
    assert info["num_shards"] == 2 and info["teachers"] == ["a", "b"]
    s = {x["teacher"]["name"]: x for x in info["shards"]}
    assert s["a"]["rows"] == R and s["a"]["teacher"]["embed_dim"] == D and s["b"]["samples"] == 7
    json.dumps(info)
