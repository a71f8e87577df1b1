"""The ``table`` dataset: a user's Parquet / Arrow file of paired modalities, read through the data
store, with every bad input refused in one line naming the file, the column and the row."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch

from ensemble_kd.storage import datastore
from ensemble_kd.cli import main
from ensemble_kd.core.config import DataConfig
from modalities.datasets import DatasetError, build_dataset
from modalities.datasets import table as table_mod

REPO = Path(__file__).resolve().parents[1]
N, C, D = 200, 3, 16


def make_arrays(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """Two learnable views of the same samples: a 16-d vector (class mean + noise) and a 1x8x8
    image (a class-specific bar + noise); every 4th row is a test row; ids are shuffled."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % C)  # (N,)
    vec = (rng.normal(size=(n, D)) + 3.0 * np.eye(C, D)[y]).astype(np.float32)  # (N, D)
    img = rng.normal(scale=0.5, size=(n, 1, 8, 8)).astype(np.float32)  # (N, 1, 8, 8)
    for c in range(C):
        img[y == c, 0, 2 * c + 1, :] += 2.0  # class c: a bright row at 2c+1
    ids = (rng.permutation(n) * 7 + 1000).astype(np.int64)  # (N,) unique, not in row order
    split = np.where(np.arange(n) % 4 == 0, "test", "train")
    return {"sample_id": ids, "label": y.astype(np.int64), "split": split, "vec": vec, "img": img}


def to_table(a: dict[str, np.ndarray]) -> pa.Table:
    n = len(a["label"])
    cols = {"sample_id": pa.array(a["sample_id"]), "label": pa.array(a["label"]), "split": pa.array(a["split"]),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(a["vec"].reshape(-1)), a["vec"].shape[1])}
    cols["img"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(a["img"]))
    assert all(len(v) == n for v in cols.values())
    return pa.table(cols)


def write(t: pa.Table, path: Path, fmt: str | None = None, rows: int = 64) -> Path:
    """``t`` as Parquet (row groups of ``rows``) or Arrow IPC file/stream (batches of ``rows``)."""
    fmt = fmt or {".parquet": "parquet", ".arrow": "arrow", ".ipc": "stream"}[path.suffix]
    if fmt == "parquet":
        pq.write_table(t, path, row_group_size=rows)
    elif fmt == "arrow":
        feather.write_feather(t, path, compression="uncompressed", chunksize=rows)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
            for b in t.to_batches(max_chunksize=rows):
                w.write_batch(b)
    return path


@pytest.fixture
def arrays():
    return make_arrays()


def rows_of(a, split):
    return np.flatnonzero(a["split"] == split)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".ipc"])
def test_serves_the_file_rows_in_file_order(tmp_path, arrays, suffix):
    path = write(to_table(arrays), tmp_path / f"t{suffix}", rows=23)  # segments that do not align with requests
    for split in ("train", "test"):
        ds = build_dataset("table", split, str(path))
        r = rows_of(arrays, split)
        assert len(ds) == len(r) and ds.num_classes == C
        assert np.array_equal(ds.sample_ids, arrays["sample_id"][r]) and np.array_equal(ds.labels, arrays["label"][r])
        assert ds.modalities["vec"].kind == "vector" and ds.modalities["vec"].shape == (D,)
        assert ds.modalities["img"].kind == "image" and ds.modalities["img"].shape == (1, 8, 8)
        idx = np.r_[np.arange(len(r))[::-1], 5, 5, 0]  # unsorted, repeated
        b = ds.get_batch(idx)
        assert b["inputs"]["vec"].dtype == torch.float32
        assert np.array_equal(b["inputs"]["vec"].numpy(), arrays["vec"][r[idx]])
        assert np.array_equal(b["inputs"]["img"].numpy(), arrays["img"][r[idx]])
        assert torch.equal(b["sample_id"], torch.from_numpy(arrays["sample_id"][r[idx]]))


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_prepare_round_trip_is_exact(tmp_path, arrays, suffix, monkeypatch):
    """The data store serves bit for bit what the source serves, and Parquet and Arrow agree."""
    path = write(to_table(arrays), tmp_path / f"t{suffix}", rows=64)
    for split in ("train", "test"):
        src = build_dataset("table", split, str(path))
        stored = datastore.prepare(DataConfig(name="table", root=str(path)), split, tmp_path / "out")
        assert isinstance(stored, datastore.StoredDataset) and stored.fingerprint() == src.fingerprint()
        assert np.array_equal(stored.sample_ids, src.sample_ids) and np.array_equal(stored.labels, src.labels)
        idx = np.arange(len(src))
        a, b = stored.get_batch(idx), src.get_batch(idx)
        for m in ("vec", "img"):
            assert torch.equal(a["inputs"][m], b["inputs"][m])
        r = rows_of(arrays, split)
        assert np.array_equal(a["inputs"]["img"].numpy(), arrays["img"][r])  # the same values from either format
        assert np.array_equal(a["inputs"]["vec"].numpy(), arrays["vec"][r])


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_store_written_from_small_chunks(tmp_path, arrays, suffix, monkeypatch):
    """Consecutive reads that start and stop inside row groups and chunks (row groups of 64,
    chunks of 5 rows, the store reading 37 rows at a time) give the same rows as one read."""
    monkeypatch.setattr(table_mod, "CHUNK_BYTES", 5 * 8 * (D + 64))  # 5 rows a chunk
    path = write(to_table(arrays), tmp_path / f"t{suffix}", rows=64)
    src = build_dataset("table", "train", str(path))
    folder = datastore.write_split(src, tmp_path / "data", src.fingerprint(), {}, part_bytes=37 * 4 * (D + 64))
    stored = datastore.StoredDataset(folder)
    assert stored.manifest["dataset"]["num_samples"] == 150  # read 37 rows at a time: 5 reads
    x = stored.get_batch(np.arange(len(src)))["inputs"]
    r = rows_of(arrays, "train")
    assert np.array_equal(x["vec"].numpy(), arrays["vec"][r]) and np.array_equal(x["img"].numpy(), arrays["img"][r])


def test_fingerprint_hashes_the_files_and_the_choice(tmp_path, arrays):
    p = write(to_table(arrays), tmp_path / "t.parquet")
    fp = build_dataset("table", "train", str(p)).fingerprint()
    assert fp == build_dataset("table", "train", str(p)).fingerprint()
    assert fp != build_dataset("table", "test", str(p)).fingerprint()
    assert fp != build_dataset("table", "train", str(p), modalities=["vec"]).fingerprint()
    assert fp != build_dataset("table", "train", str(p), num_classes=5).fingerprint()
    arrays["vec"][1, 0] += 1.0  # one value of one train row
    write(to_table(arrays), p)
    assert fp != build_dataset("table", "train", str(p)).fingerprint()


def test_folder_concatenates_files_in_name_order(tmp_path, arrays):
    t = to_table(arrays)
    folder = tmp_path / "parts"
    folder.mkdir()
    write(t.slice(120), folder / "b.arrow")  # name order, not creation order
    write(t.slice(0, 120), folder / "a.parquet")
    (folder / "README.txt").write_text("not data")  # other files are ignored
    whole = build_dataset("table", "train", str(write(t, tmp_path / "t.parquet")))
    ds = build_dataset("table", "train", str(folder))
    assert np.array_equal(ds.sample_ids, whole.sample_ids)
    idx = np.arange(len(ds))
    assert torch.equal(ds.get_batch(idx)["inputs"]["img"], whole.get_batch(idx)["inputs"]["img"])


def test_value_types_and_shapes(tmp_path, arrays):
    """uint8 is stored uint8 and served /255; float16/float64 as float32; a rank-2 tensor is a
    (1, H, W) image; a list column of one length (pandas' numpy arrays) is a vector."""
    pix = (np.arange(N * 64) % 256).astype(np.uint8).reshape(N, 8, 8)  # (N, H, W)
    t = to_table(arrays).drop_columns(["vec", "img"])
    t = t.append_column("pix", pa.FixedShapeTensorArray.from_numpy_ndarray(pix))
    t = t.append_column("half", pa.FixedSizeListArray.from_arrays(pa.array(arrays["vec"].astype(np.float16).reshape(-1)), D))
    t = t.append_column("dbl", pa.array(list(arrays["vec"].astype(np.float64))))  # list<double>
    ds = build_dataset("table", "train", str(write(t, tmp_path / "t.parquet")))
    r = rows_of(arrays, "train")
    assert ds.modalities["pix"].shape == (1, 8, 8) and ds.modalities["pix"].kind == "image"
    assert ds.modalities["dbl"].shape == (D,) and ds.modalities["half"].shape == (D,)
    assert ds.stored_forms()["pix"].dtype == "uint8" and ds.stored_forms()["dbl"].dtype == "float32"
    stored = ds.stored_batch(np.arange(4), ["pix", "dbl"])
    assert stored["pix"].dtype == np.uint8 and np.array_equal(stored["pix"], pix[r[:4]].reshape(4, -1))
    x = ds.get_batch(np.arange(len(ds)))["inputs"]
    assert torch.equal(x["pix"], torch.from_numpy(pix[r][:, None].astype(np.float32)) / 255.0)
    assert np.array_equal(x["half"].numpy(), arrays["vec"].astype(np.float16).astype(np.float32)[r])
    assert np.array_equal(x["dbl"].numpy(), arrays["vec"][r])  # float32 -> float64 -> float32 is exact


def test_options_modalities_and_num_classes(tmp_path, arrays):
    arrays["label"][arrays["split"] == "test"] %= 2  # class 2 only in the train split
    p = write(to_table(arrays), tmp_path / "t.parquet")
    test = build_dataset("table", "test", str(p), modalities=["img"])
    assert list(test.modalities) == ["img"] and test.num_classes == C  # counted over both splits
    assert build_dataset("table", "test", str(p), num_classes=7).num_classes == 7
    # (a class without train rows: tests/test_table_labels.py)


def test_pandas_index_column_is_not_a_modality(tmp_path, arrays):
    import pandas as pd

    df = pd.DataFrame({"sample_id": arrays["sample_id"], "label": arrays["label"], "split": arrays["split"],
                       "vec": list(arrays["vec"])}, index=pd.Index(np.arange(N) * 2, name="orig"))
    df.to_parquet(tmp_path / "t.parquet")
    assert list(build_dataset("table", "train", str(tmp_path / "t.parquet")).modalities) == ["vec"]


# ----------------------------------------------------------------------------------------------
# bad input: one line, naming the file, the column and the row
# ----------------------------------------------------------------------------------------------
def _set(t: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, arr)


def _with_value(a, column, row, value):
    a = {k: v.copy() for k, v in a.items()}
    a[column] = a[column].astype(object) if isinstance(value, str) or value is None else a[column]
    a[column][row] = value
    return a


def _bad_tables(a):
    """name -> (table, column, row or None, words the message must hold)."""
    t = to_table(a)
    ids = a["sample_id"]
    dup = ids.copy()
    dup[150] = dup[40]
    ragged = list(a["vec"].astype(np.float64))
    ragged[77] = ragged[77][:-1]
    nan_vec = a["vec"].copy()
    nan_vec[131, 3] = np.nan
    inf_img = a["img"].copy()
    inf_img[9, 0, 1, 2] = np.inf
    null_label = pa.array([None if i == 12 else int(v) for i, v in enumerate(a["label"])], pa.int64())
    null_id = pa.array([None if i == 3 else int(v) for i, v in enumerate(ids)], pa.int64())
    big = a["label"].copy()
    big[61] = 3
    neg = a["label"].copy()
    neg[18] = -1
    return {
        "duplicate": (_set(t, "sample_id", pa.array(dup)), "sample_id", 150, ["already used by row 40", f"{dup[40]}"]),
        "null sample_id": (_set(t, "sample_id", null_id), "sample_id", 3, ["null sample_id"]),
        "null label": (_set(t, "label", null_label), "label", 12, ["null label", f"sample_id {ids[12]}"]),
        "label too big": (_set(t, "label", pa.array(big)), "label", 61,  # with num_classes=3
                          ["out of range 0..2", "num_classes", f"sample_id {ids[61]}"]),
        "label negative": (_set(t, "label", pa.array(neg)), "label", 18, ["negative", f"sample_id {ids[18]}"]),
        "split": (_set(t, "split", pa.array(np.where(np.arange(N) == 33, "valid", a["split"]))), "split", 33,
                  ["'valid'", "is not 'train', 'test' or 'val'", f"sample_id {ids[33]}"]),
        "string modality": (_set(t, "vec", pa.array([str(i) for i in range(N)])), "vec", None, ["string"]),
        "int modality": (_set(t, "vec", pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(N * D, np.int32)), D)),
                         "vec", None, ["int32", "fixed-size list of floats"]),
        "ragged": (_set(t, "vec", pa.array(ragged)), "vec", 77, ["15 values", "first row has 16", f"sample_id {ids[77]}"]),
        "rank 4": (_set(t, "img", pa.FixedShapeTensorArray.from_numpy_ndarray(a["img"][:, None].copy())), "img", None,
                   ["rank 4"]),
        "permuted": (_set(t, "img", pa.FixedShapeTensorArray.from_numpy_ndarray(a["img"][:, 0][:, None])), "img", None,
                     ["permutation", "x.copy()"]),
        "nan": (_set(t, "vec", pa.FixedSizeListArray.from_arrays(pa.array(nan_vec.reshape(-1)), D)), "vec", 131,
                ["nan", "position 3", "finite", f"sample_id {ids[131]}"]),
        "inf": (_set(t, "img", pa.FixedShapeTensorArray.from_numpy_ndarray(inf_img)), "img", 9, ["inf", "finite"]),
        "missing label": (t.drop_columns(["label"]), "label", None, ["has no column"]),
        "missing split": (t.drop_columns(["split"]), "split", None, ["has no column"]),
        "missing sample_id": (t.drop_columns(["sample_id"]), "sample_id", None, ["has no column"]),
        "no test rows": (_set(t, "split", pa.array(["train"] * N)), "split", None, ["no 'test' rows"]),
    }


@pytest.mark.parametrize("case", ["duplicate", "null sample_id", "null label", "label too big", "label negative", "split",
                                  "string modality", "int modality", "ragged", "rank 4", "permuted", "nan", "inf", "missing label",
                                  "missing split", "missing sample_id", "no test rows"])
@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_bad_table_names_file_column_row(tmp_path, arrays, case, suffix):
    t, column, row, words = _bad_tables(arrays)[case]
    path = write(t, tmp_path / f"bad{suffix}")
    kwargs = {"num_classes": 3} if case == "label too big" else {}
    for split in ("train", "test"):  # the whole table is checked, whichever split is asked for
        with pytest.raises(DatasetError) as e:
            build_dataset("table", split, str(path), **kwargs)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and repr(column) in msg, msg
        if row is not None:
            assert f"row {row}" in msg, msg
        for w in words:
            assert w in msg, msg


def test_bad_files(tmp_path, arrays):
    t = to_table(arrays)
    csv = tmp_path / "t.parquet"
    csv.write_text("sample_id,label,split\n1,0,train\n")
    with pytest.raises(DatasetError, match=f"{csv} is not a Parquet or Arrow IPC file"):
        build_dataset("table", "train", str(csv))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(write(t, tmp_path / "whole.parquet").read_bytes()[:3000])
    with pytest.raises(DatasetError, match=f"{cut}"):
        build_dataset("table", "train", str(cut))
    folder = tmp_path / "parts"
    folder.mkdir()
    write(t.slice(0, 100), folder / "a.parquet")
    other = t.slice(100).set_column(3, "vec", pa.array(list(arrays["vec"][100:].astype(np.float64))))
    write(other, folder / "b.parquet")
    with pytest.raises(DatasetError) as e:
        build_dataset("table", "train", str(folder))
    assert str(folder / "a.parquet") in str(e.value) and str(folder / "b.parquet") in str(e.value) and "'vec'" in str(e.value)
    with pytest.raises(DatasetError, match="has no column 'colour'.*vec, img"):
        build_dataset("table", "train", str(tmp_path / "whole.parquet"), modalities=["colour"])
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset("table", "train", str(tmp_path / "nope.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no .parquet"):
        build_dataset("table", "train", str(tmp_path / "empty"))


def test_cli_prepare_refuses_a_bad_table_in_one_line(tmp_path, arrays, capsys):
    a = _with_value(arrays, "split", 150, "Test")
    path = write(to_table(a), tmp_path / "user.parquet")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{name: table, root: {path}}}\ndistill: {{student: {{modality: vec}}}}\n")  # (a modality it has)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ensemble-kd: error:") and "Traceback" not in err, err
    assert str(path) in err and "column 'split', row 150" in err and "'Test'" in err
    assert not (out / "data").exists() or not any((out / "data").iterdir())


# ----------------------------------------------------------------------------------------------
# the README's recipe, and a whole run on a user's file
# ----------------------------------------------------------------------------------------------
def test_readme_recipe_runs(tmp_path, monkeypatch):
    """The snippet of the README's "Your own data: a table" section, as written there."""
    monkeypatch.chdir(tmp_path)
    # -- from the README ------------------------------------------------------------------------
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 300
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)                                      # (N,) classes 0..2
    spectra = rng.normal(size=(n, 16)).astype("float32")               # (N, 16): one view
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)        # (N, C, H, W): another view
    df = pd.DataFrame({"sample_id": np.arange(n), "label": labels,
                       "split": np.where(np.arange(n) % 5 == 0, "test", "train")})

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.append_column("spectrum", pa.FixedSizeListArray.from_arrays(pa.array(spectra.ravel()), 16))
    table = table.append_column("image", pa.FixedShapeTensorArray.from_numpy_ndarray(images))
    pq.write_table(table, "samples.parquet")
    # -------------------------------------------------------------------------------------------
    ds = build_dataset("table", "train", "samples.parquet")
    assert len(ds) == 240 and ds.modalities["image"].shape == (1, 8, 8) and ds.modalities["spectrum"].shape == (16,)
    assert ds.stored_forms()["image"].dtype == "uint8"


CONFIG = """\
name: my-table
data: {{name: table, root: {root}}}
device: cpu
teachers:
  - {{name: vec_mlp, arch: mlp, modality: vec, epochs: 10, arch_kwargs: {{hidden: [32]}}}}
embed: {{splits: [train, test], batch_size: 256, cpus_per_actor: 0.5}}
distill:
  teachers: [vec_mlp]
  student: {{arch: cnn_small, modality: img, arch_kwargs: {{width: 8}}}}
  losses: [{{name: ce}}, {{name: kd, kwargs: {{temperature: 4.0}}}}]
  epochs: 3
  cpus_per_worker: 0.5
  optim: {{lr: 0.05, schedule: cosine}}
ray: {{num_cpus: 2}}
tracking: {{enabled: true}}
run:
  seeds: [0]
  export: false
  arms:
    - {{name: student-ce, teachers: none, losses: [{{name: ce}}]}}
    - {{name: kd, teachers: all}}
tune: {{cpus_per_trial: 0.5, max_concurrent_trials: 2}}
"""


@pytest.mark.slow
def test_run_end_to_end_on_a_users_parquet(tmp_path):
    """`ensemble-kd run` on a user's Parquet file: a teacher on the vector view, a CNN student on
    the image view, no code."""
    path = write(to_table(make_arrays()), tmp_path / "user.parquet")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.format(root=path))
    out = tmp_path / "out"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", "run", "--config", str(cfg), "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"student-ce", "kd"}
    for arm in summary["arms"].values():
        assert 0.0 <= arm["mean_top1"] <= 1.0
    assert summary["teachers"]["vec_mlp"]["test_top1"] > 0.6  # the vector view is learnable: well above 1/3
    assert any(p.name.startswith("table__train__") for p in (out / "data").iterdir())


# ----------------------------------------------------------------------------------------------
# paired-folder: root/<modality>/<split>/<class>/<sample>.<ext>
# ----------------------------------------------------------------------------------------------
def make_paired_folder(root: Path) -> dict[tuple[str, str, str], np.ndarray]:
    """rgb (PNG, 3 channels) and depth (BMP, grey) views of the same samples, 8x8; returns
    (modality, split, class/name) -> the uint8 (C, 8, 8) pixels written."""
    from PIL import Image

    rng = np.random.default_rng(1)
    written = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for ci, cls in enumerate(("cat", "dog")):
            for k in range(per_class):
                key = f"{cls}/{split[:2]}{ci}{k:02d}"
                rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                depth = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                for m, arr, ext in (("rgb", rgb, ".png"), ("depth", depth, ".bmp")):
                    f = root / m / split / f"{key}{ext}"
                    f.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(f)
                    written[(m, split, key)] = arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]
    return written


PAIRED_KW = {"image_size": 8, "channels": {"rgb": 3, "depth": 1}}


def test_paired_folder_pairs_by_path_and_round_trips(tmp_path):
    written = make_paired_folder(tmp_path / "pf")
    root = str(tmp_path / "pf")
    tr = build_dataset("paired-folder", "train", root, normalize=False, **PAIRED_KW)
    te = build_dataset("paired-folder", "test", root, normalize=False, **PAIRED_KW)
    assert tr.classes == ["cat", "dog"] and tr.num_classes == 2 and len(tr) == 6 and len(te) == 4
    assert list(tr.labels) == [0, 0, 0, 1, 1, 1] and list(te.sample_ids) == [10**9 + i for i in range(4)]
    assert tr.modalities["rgb"].shape == (3, 8, 8) and tr.modalities["depth"].shape == (1, 8, 8)
    keys = sorted(k for (m, s, k) in written if m == "rgb" and s == "test")
    x = te.get_batch(np.arange(4))["inputs"]
    for i, k in enumerate(keys):  # row i of every modality is the same sample
        for m in ("rgb", "depth"):
            assert torch.equal(x[m][i], torch.from_numpy(written[(m, "test", k)].astype(np.float32)) / 255.0)
    cfg = DataConfig(name="paired-folder", root=root, kwargs=PAIRED_KW)
    for split, src in (("train", build_dataset("paired-folder", "train", root, **PAIRED_KW)),
                       ("test", build_dataset("paired-folder", "test", root, **PAIRED_KW))):
        stored = datastore.prepare(cfg, split, tmp_path / "out")
        assert stored.fingerprint() == src.fingerprint() and stored.stored_forms()["rgb"].dtype == "uint8"
        idx = np.arange(len(src))
        a, b = stored.get_batch(idx), src.get_batch(idx)
        assert all(torch.equal(a["inputs"][m], b["inputs"][m]) for m in ("rgb", "depth"))
        train_mean = build_dataset("paired-folder", "train", root, **PAIRED_KW).stored_forms()["depth"].mean
        assert stored.stored_forms()["depth"].mean == train_mean  # test is standardised with train's statistics


def test_paired_folder_refuses_unpaired_samples(tmp_path):
    make_paired_folder(tmp_path / "pf")
    root = tmp_path / "pf"
    (root / "depth" / "train" / "cat" / "tr001.bmp").unlink()
    with pytest.raises(DatasetError) as e:
        build_dataset("paired-folder", "train", str(root), **PAIRED_KW)
    assert str(root / "rgb" / "train" / "cat" / "tr001.png") in str(e.value)
    assert f"no pair in modality folder {root / 'depth' / 'train'}" in str(e.value)
    os.replace(root / "depth" / "train" / "dog" / "tr101.bmp", root / "depth" / "train" / "cat" / "tr001.bmp")
    with pytest.raises(DatasetError) as e:  # cat/tr001 is now paired; dog/tr101 lost its pair
        build_dataset("paired-folder", "train", str(root), **PAIRED_KW)
    assert str(root / "rgb" / "train" / "dog" / "tr101.png") in str(e.value)
    (root / "depth" / "train" / "dog" / "tr101.bmp").write_bytes((root / "depth" / "train" / "cat" / "tr001.bmp").read_bytes())
    (root / "depth" / "train" / "cat" / "tr001.bmp").rename(root / "depth" / "train" / "dog" / "tr001.bmp")
    with pytest.raises(DatasetError) as e:  # the same sample filed under another class
        build_dataset("paired-folder", "train", str(root), **PAIRED_KW)
    msg = str(e.value)
    assert str(root / "rgb" / "train" / "cat" / "tr001.png") in msg and str(root / "depth" / "train" / "dog" / "tr001.bmp") in msg
    assert "class 'cat'" in msg and "class 'dog'" in msg


def test_paired_folder_refuses_ambiguous_files_and_class_mismatch(tmp_path):
    make_paired_folder(tmp_path / "pf")
    root = tmp_path / "pf"
    twin = root / "rgb" / "test" / "dog" / "te101.jpg"
    twin.write_bytes((root / "rgb" / "test" / "dog" / "te101.png").read_bytes())
    with pytest.raises(DatasetError, match="te101.jpg and .*te101.png are the same sample twice"):
        build_dataset("paired-folder", "test", str(root), **PAIRED_KW)
    twin.unlink()
    (root / "depth" / "train" / "bird").mkdir()
    with pytest.raises(DatasetError, match="depth/train has class 'bird', .*rgb/train has not"):
        build_dataset("paired-folder", "test", str(root), **PAIRED_KW)
    with pytest.raises(DatasetError, match="no modality folder 'ir'"):
        build_dataset("paired-folder", "train", str(root), modalities=["rgb", "ir"])


def test_bad_options(tmp_path, arrays):
    p = str(write(to_table(arrays), tmp_path / "t.parquet"))
    for kw, words in (({"modalities": "vec"}, "list of column names"), ({"modalities": ["label"]}, "key column"),
                      ({"num_classes": [3]}, "positive integer"), ({"num_classes": 0}, "positive integer")):
        with pytest.raises(DatasetError, match=words):
            build_dataset("table", "train", p, **kw)
