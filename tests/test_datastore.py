"""The data store: a split written once as memory-mapped Arrow, read back bit for bit, reused,
refused when damaged, and opened without copying the data into the process's heap."""
from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ensemble_kd.storage import datastore
from ensemble_kd.cli import main
from ensemble_kd.core.config import DataConfig
from ensemble_kd.storage.datastore import DataStoreError, StoredDataset, open_split, prepare, write_split
from ensemble_kd.core.rows import PartedRows
from modalities import build_dataset


def _same_batches(a, b, rows) -> None:
    x, y = a.get_batch(rows), b.get_batch(rows)
    assert torch.equal(x["sample_id"], y["sample_id"]) and torch.equal(x["label"], y["label"])
    assert set(x["inputs"]) == set(y["inputs"])
    for m in x["inputs"]:
        assert x["inputs"][m].dtype == y["inputs"][m].dtype == torch.float32
        assert torch.equal(x["inputs"][m], y["inputs"][m]), m  # bit for bit


@pytest.fixture(autouse=True)
def _fresh_cache():
    datastore._OPEN.clear()  # each test sees what a new process would
    yield
    datastore._OPEN.clear()


def test_shipped_dataset_round_trips_bit_for_bit(tmp_path):
    src = build_dataset("uci-mfeat", "train")
    ds = prepare(DataConfig(), "train", tmp_path)
    assert isinstance(ds, StoredDataset) and ds.dir.parent == tmp_path / "data"
    assert ds.fingerprint() == src.fingerprint()  # the shards' keys name the same data
    assert np.array_equal(ds.sample_ids, src.sample_ids) and np.array_equal(ds.labels, src.labels)
    assert ds.modalities == src.modalities and ds.num_classes == src.num_classes
    rows = np.random.default_rng(0).permutation(len(src))[:300]
    _same_batches(ds, src, rows)
    _same_batches(ds, src, np.arange(len(src)))


def _image_folder(root: Path, n_per_class: int = 6) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_uint8_images_are_stored_decoded_and_served_bit_for_bit(tmp_path):
    """An image folder: stored once as uint8 at the configured size, standardised per batch with
    the train split's constants, equal to what the source serves."""
    _image_folder(tmp_path / "imgs")
    data = DataConfig(name="image-folder", root=str(tmp_path / "imgs"), kwargs={"image_size": 8})
    for split in ("train", "test"):
        src = build_dataset(data.name, split, data.root, **data.kwargs)
        ds = prepare(data, split, tmp_path / "out")
        assert ds.manifest["modalities"]["image"]["dtype"] == "uint8"  # 1 byte a pixel on disk
        assert ds.manifest["modalities"]["image"]["mean"] is not None
        assert ds.classes == ["a", "b"]
        _same_batches(ds, src, np.arange(len(src))[::-1])


def test_a_split_is_reused_and_a_changed_source_is_read_again(tmp_path):
    _image_folder(tmp_path / "imgs", 3)
    data = DataConfig(name="image-folder", root=str(tmp_path / "imgs"), kwargs={"image_size": 8})
    first = prepare(data, "train", tmp_path / "out")
    part = first.dir / "image.arrow"
    mtime = part.stat().st_mtime_ns
    datastore._OPEN.clear()
    again = prepare(data, "train", tmp_path / "out")
    assert again.dir == first.dir and part.stat().st_mtime_ns == mtime  # not rewritten
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "train" / "a" / "new.png")
    datastore._OPEN.clear()
    changed = prepare(data, "train", tmp_path / "out")
    assert changed.dir != first.dir and len(changed) == len(first) + 1  # new content, new folder
    pointers = list((tmp_path / "out" / "data").glob("image-folder__train__*.json"))
    assert len(pointers) == 1 and json.loads(pointers[0].read_text())["dir"] == changed.dir.name


def test_a_worker_follows_the_pointer_and_prepares_on_first_use(tmp_path):
    ds = open_split(DataConfig(), "test", tmp_path)  # no pointer yet: prepared here
    datastore._OPEN.clear()
    again = open_split(DataConfig(), "test", tmp_path)
    assert again.dir == ds.dir and not again.verified  # a worker checks sizes and schemas, not hashes


def test_damaged_bytes_are_rewritten_by_prepare_and_a_truncated_file_is_refused_by_name(tmp_path):
    ds = prepare(DataConfig(), "train", tmp_path)
    part = ds.dir / "fou.arrow"
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other bytes
    part.write_bytes(bytes(raw))
    datastore._OPEN.clear()
    logs: list[str] = []
    fixed = prepare(DataConfig(), "train", tmp_path, log=logs.append)
    assert any("damaged" in m and "rewriting" in m for m in logs), logs
    _same_batches(fixed, build_dataset("uci-mfeat", "train"), np.arange(50))
    with open(fixed.dir / "fou.arrow", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataStoreError, match=r"fou\.arrow is 1000 bytes"):
        StoredDataset(fixed.dir, verify=False)


def test_half_written_and_foreign_folders_are_never_opened(tmp_path):
    src = build_dataset("uci-mfeat", "test")
    root = tmp_path / "data"
    root.mkdir()
    (root / "uci-mfeat__test__0123456789abcdef").mkdir()  # no manifest: an unfinished or foreign folder
    with pytest.raises(DataStoreError, match="has no manifest.json"):
        StoredDataset(root / "uci-mfeat__test__0123456789abcdef")
    ptr = datastore._pointer_path(root, DataConfig(), "test")
    ptr.write_text(json.dumps({"format": datastore.POINTER_FORMAT, "dir": "../elsewhere"}))
    ds = open_split(DataConfig(), "test", tmp_path)  # a pointer out of the store is ignored: prepared again
    assert ds.dir.parent == root and len(ds) == len(src)


def test_a_split_read_in_many_chunks_is_one_contiguous_column(tmp_path):
    """Written from the source ~38 rows at a time, each modality still lands as one record batch."""
    src = build_dataset("uci-mfeat", "train")
    folder = write_split(src, tmp_path, src.fingerprint(), {}, part_bytes=100_000)
    ds = StoredDataset(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", "index.arrow",
                                                               *(f"{m}.arrow" for m in src.modalities)])  # no scratch left
    for m, rows in ds._rows.items():
        assert rows.shape == (len(src), src.modalities[m].numel) and rows.base is not None  # a view, not a copy
    _same_batches(ds, src, np.random.default_rng(3).permutation(len(src)))


def test_opening_a_split_copies_no_data_into_the_heap(tmp_path):
    """The columns are views of the memory map: opening a ~20 MB split allocates well under 1 MB."""
    class Big:
        name, split, num_classes = "big", "train", 3
        from modalities.spec import ModalitySpec
        modalities = {"v": ModalitySpec("v", "vector", (512,))}
        sample_ids = np.arange(10_000, dtype=np.int64)
        labels = np.arange(10_000, dtype=np.int64) % 3

        def __len__(self):
            return 10_000

        def stored_forms(self):
            from modalities.datasets.base import StoredForm
            return {"v": StoredForm()}

        def stored_batch(self, index, mods):
            return {"v": np.ones((len(index), 512), dtype=np.float32) * np.asarray(index, np.float32)[:, None]}

    folder = write_split(Big(), tmp_path, "f" * 64, {})
    tracemalloc.start()
    ds = StoredDataset(folder, verify=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ds.manifest["modalities"]["v"]["file"]["bytes"] > 20_000_000
    assert peak < 1_000_000, peak
    assert not ds.sample_ids.flags.writeable  # a read-only view of the file
    x = ds.get_batch([9_999, 3])["inputs"]["v"]
    assert x.shape == (2, 512) and float(x[0, 0]) == 9_999.0 and float(x[1, 511]) == 3.0


def test_parted_rows_gather_equals_the_concatenated_column():
    parts = [np.arange(i * 30, i * 30 + 30 * 4, dtype=np.float32).reshape(-1, 4) for i in range(0, 12, 4)]
    whole = np.concatenate(parts)
    pr = PartedRows(parts)
    rows = np.random.default_rng(0).integers(-len(whole), len(whole), 200)
    assert pr.shape == torch.Size(whole.shape) and pr.dtype == torch.float32
    assert torch.equal(pr[torch.from_numpy(rows)], torch.from_numpy(whole[rows]))
    assert torch.equal(pr.full(), torch.from_numpy(whole))
    with pytest.raises(IndexError):
        pr[[len(whole)]]


def test_cli_data_prepare_prints_each_split_folder(tmp_path, capsys):
    assert main(["data", "prepare", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if ln.startswith("uci-mfeat/")]
    assert [ln.split(":")[0] for ln in lines] == ["uci-mfeat/train", "uci-mfeat/test"]
    for ln in lines:
        path, said = ln.split(": ", 1)[1].rsplit(" (", 1)
        assert (Path(path) / "manifest.json").is_file() and said == "written)"
    assert os.listdir(tmp_path) == ["data"]  # nothing else: no Ray, no MLflow store
