"""A table's labels (modalities/datasets/table.py): string labels are classes in sorted order, the
names kept in the data store's manifest and shown by `ensemble-kd data prepare`; integer labels work
as before; a negative label, or a class without a single train row (unless data.kwargs.num_classes
is given), is refused in one line naming the file, the column, a row and the fix, before any work."""
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

from ensemble_kd.cli import main
from ensemble_kd.core.config import DataConfig
from ensemble_kd.storage import datastore
from modalities.datasets import DatasetError, build_dataset
from modalities.datasets.base import class_names
from tests.helpers import refused_here

N = 40


def table(labels, split=None) -> pa.Table:
    """``labels`` (N,) ints or strings; every 4th row a test row (row 1, 5, ...) unless ``split``;
    one 3-d vector column ``vec`` whose first value is the row number."""
    n = len(labels)
    split = np.where(np.arange(n) % 4 == 1, "test", "train") if split is None else np.asarray(split)
    vec = np.zeros((n, 3), np.float32)
    vec[:, 0] = np.arange(n)
    return pa.table({"sample_id": np.arange(n) * 3 + 100, "label": pa.array(labels), "split": split,
                     "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 3)})


ANIMALS = np.array(["dog", "cat", "emu", "ant", "cat"] * (N // 5))  # (N,) sorted: ant=0, cat=1, dog=2, emu=3


def config(tmp_path: Path, root: Path, **kwargs) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{name: table, root: {root}, kwargs: {json.dumps(kwargs)}}}\n"
                   "distill: {student: {modality: vec}}\n")
    return cfg


# ----------------------------------------------------------------------------------------------
# string labels: classes in sorted order
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encode", ["string", "large_string", "dictionary"])
def test_string_labels_are_classes_in_sorted_order(tmp_path, encode):
    arr = pa.array(ANIMALS, pa.large_string() if encode == "large_string" else pa.string())
    arr = arr.dictionary_encode() if encode == "dictionary" else arr
    p = tmp_path / "t.parquet"
    pq.write_table(table(arr), p)
    want = {"ant": 0, "cat": 1, "dog": 2, "emu": 3}
    for split, rows in (("train", np.arange(N) % 4 != 1), ("test", np.arange(N) % 4 == 1)):
        ds = build_dataset("table", split, str(p))
        assert ds.classes == ["ant", "cat", "dog", "emu"] and ds.num_classes == 4
        assert ds.labels.dtype == np.int64 and list(ds.labels) == [want[a] for a in ANIMALS[rows]]
        assert int(ds[0]["label"]) == want[ANIMALS[rows][0]]


def test_the_names_of_every_file_of_a_folder_are_numbered_together(tmp_path):
    t = table(ANIMALS)
    (tmp_path / "parts").mkdir()
    feather.write_feather(t.slice(0, 10), tmp_path / "parts" / "a.arrow", compression="uncompressed")
    pq.write_table(t.slice(10), tmp_path / "parts" / "b.parquet")
    pq.write_table(t, tmp_path / "whole.parquet")
    parts = build_dataset("table", "train", str(tmp_path / "parts"))
    whole = build_dataset("table", "train", str(tmp_path / "whole.parquet"))
    assert parts.classes == whole.classes == ["ant", "cat", "dog", "emu"]
    assert np.array_equal(parts.labels, whole.labels)


def test_sorted_is_python_string_order(tmp_path):
    names = np.array(["b", "B", "a", "é", "10", "9"] * 4)
    pq.write_table(table(names, split=["train"] * 18 + ["test"] * 6), tmp_path / "t.parquet")
    assert build_dataset("table", "train", str(tmp_path / "t.parquet")).classes == sorted(set(names))


def test_prepare_keeps_the_names_in_the_manifest_and_says_them(tmp_path, capsys):
    p = tmp_path / "t.parquet"
    pq.write_table(table(ANIMALS), p)
    cfg, out = config(tmp_path, p), tmp_path / "out"
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("table/", "  classes"))]
    assert lines[1:] == ["  classes: ant=0, cat=1, dog=2, emu=3", lines[2]], lines  # under the dataset's first split
    assert lines[0].startswith("table/train: ") and lines[2].startswith("table/test: ")
    for split in ("train", "test"):
        stored = datastore.prepare(DataConfig(name="table", root=str(p)), split, out)
        assert datastore.read_manifest(stored.dir)["dataset"]["classes"] == ["ant", "cat", "dog", "emu"]
        assert stored.classes == ["ant", "cat", "dog", "emu"]
        assert np.array_equal(stored.labels, build_dataset("table", split, str(p)).labels)
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(out)]) == 0  # reused: said again
    assert "  classes: ant=0, cat=1, dog=2, emu=3" in capsys.readouterr().out.splitlines()


def test_many_classes_are_shown_truncated(tmp_path, capsys):
    names = np.array([f"k{i:02d}" for i in range(15)] * 2)
    pq.write_table(table(names, split=["train"] * 15 + ["test"] * 15), tmp_path / "t.parquet")
    assert main(["data", "prepare", "--config", str(config(tmp_path, tmp_path / "t.parquet")),
                 "--out", str(tmp_path / "out")]) == 0
    shown = [ln for ln in capsys.readouterr().out.splitlines() if "classes:" in ln]
    assert shown == ["  classes: k00=0, k01=1, k02=2, k03=3, k04=4, k05=5, k06=6, k07=7, k08=8, k09=9, "
                     "... (5 more, 15 in all)"], shown
    assert class_names(["a", "b"]) == "a=0, b=1"


def test_names_change_the_fingerprint(tmp_path):
    pq.write_table(table(ANIMALS), tmp_path / "a.parquet")
    pq.write_table(table(np.char.upper(ANIMALS)), tmp_path / "b.parquet")  # same class numbers, other names
    a, b = (build_dataset("table", "train", str(tmp_path / f)) for f in ("a.parquet", "b.parquet"))
    assert np.array_equal(a.labels, b.labels) and a.fingerprint() != b.fingerprint()


# ----------------------------------------------------------------------------------------------
# integer labels: as before
# ----------------------------------------------------------------------------------------------
def test_integer_labels_work_as_before(tmp_path, capsys):
    labels = np.arange(N) % 3
    p = tmp_path / "t.parquet"
    pq.write_table(table(labels), p)
    ds = build_dataset("table", "train", str(p))
    assert ds.classes is None and ds.num_classes == 3 and list(ds.labels) == list(labels[np.arange(N) % 4 != 1])
    out = tmp_path / "out"
    assert main(["data", "prepare", "--config", str(config(tmp_path, p)), "--out", str(out)]) == 0
    assert "classes:" not in capsys.readouterr().out
    stored = datastore.prepare(DataConfig(name="table", root=str(p)), "train", out)
    assert datastore.read_manifest(stored.dir)["dataset"]["classes"] is None


# ----------------------------------------------------------------------------------------------
# refused: one line naming the file, the column, a row and the fix, before any work
# ----------------------------------------------------------------------------------------------
def test_a_negative_label_is_refused(tmp_path, capsys):
    labels = np.arange(N) % 3
    labels[13] = -2
    p = tmp_path / "neg.parquet"
    pq.write_table(table(labels), p)
    msg = refused_here(capsys, "data", "prepare", "--config", str(config(tmp_path, p)), "--out", str(tmp_path / "out"))
    assert f"{p}: column 'label', row 13 (sample_id 139): label -2 is negative" in msg and "renumber" in msg, msg
    assert not (tmp_path / "out" / "data").exists() or not any((tmp_path / "out" / "data").iterdir())


def test_a_class_only_test_rows_have_is_refused_unless_num_classes(tmp_path, capsys):
    labels = np.where(np.arange(N) % 4 == 1, np.arange(N) % 3, np.arange(N) % 2)  # class 2: test rows only
    p = tmp_path / "t.parquet"
    pq.write_table(table(labels), p)
    first = int(np.flatnonzero(labels == 2)[0])
    msg = refused_here(capsys, "data", "prepare", "--config", str(config(tmp_path, p)), "--out", str(tmp_path / "out"))
    assert f"{p}: column 'label', row {first} (sample_id {first * 3 + 100}): label 2 is in no train row " \
           "(only test rows have it)" in msg, msg
    assert "data.kwargs.num_classes: 3" in msg, msg
    ds = build_dataset("table", "train", str(p), num_classes=3)  # the fix: the class is kept on purpose
    assert ds.num_classes == 3 and set(ds.labels) == {0, 1}


def test_a_gap_in_the_labels_is_refused_unless_num_classes(tmp_path):
    labels = np.array([0, 1, 3, 1] * (N // 4))  # no row has label 2
    p = tmp_path / "gap.arrow"
    feather.write_feather(table(labels), p, compression="uncompressed")
    with pytest.raises(DatasetError) as e:
        build_dataset("table", "test", str(p))
    msg = str(e.value)
    assert "\n" not in msg and f"{p}: column 'label', row 2 (sample_id 106): label 3 makes the classes 0..3, but no " \
           "row has label 2" in msg and "without gaps" in msg and "data.kwargs.num_classes: 4" in msg, msg
    assert build_dataset("table", "train", str(p), num_classes=4).num_classes == 4


def test_a_name_only_test_rows_have_is_refused_and_num_classes_must_count_the_names(tmp_path):
    names = ANIMALS.copy()
    names[5] = "yak"  # row 5 is a test row
    p = tmp_path / "t.parquet"
    pq.write_table(table(names), p)
    with pytest.raises(DatasetError, match=r"column 'label', row 5 \(sample_id 115\): label 'yak' is in no train row "
                                           r"\(only test rows have it\).*num_classes: 5"):
        build_dataset("table", "train", str(p))
    assert build_dataset("table", "train", str(p), num_classes=5).classes == ["ant", "cat", "dog", "emu", "yak"]
    with pytest.raises(DatasetError, match=r"column 'label' holds 5 class names \(ant=0, .*yak=4\) and "
                                           r"data.kwargs.num_classes is 7; set it to 5"):
        build_dataset("table", "train", str(p), num_classes=7)


def test_a_label_neither_integer_nor_string_is_refused(tmp_path):
    pq.write_table(table(np.arange(N) % 3 * 1.0), tmp_path / "f.parquet")
    with pytest.raises(DatasetError, match="column 'label' is double; it must hold integer classes 0..C-1 or strings"):
        build_dataset("table", "train", str(tmp_path / "f.parquet"))


def test_run_refuses_bad_labels_before_ray_starts(tmp_path):
    """The real command in its own process (no Ray of this test session's around it): refused in one
    line, exit 2, and no Ray was started (no Ray temp dir of its own)."""
    labels = np.array([0, 1, 3, 1] * (N // 4))
    p = tmp_path / "gap.parquet"
    pq.write_table(table(labels), p)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {{name: table, root: {p}}}\nteachers: [{{name: t, arch: mlp, modality: vec, epochs: 1}}]\n"
                   "distill: {teachers: [t], student: {modality: vec}, epochs: 1}\n"
                   "tracking: {enabled: false}\nrun: {export: false}\n")
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"EKD_RAY_TMPDIR": str(ray_tmp)}
    r = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", "run", "--config", str(cfg), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("ensemble-kd: error: "), (r.returncode, r.stderr)
    msg = lines[0]
    assert f"{p}: column 'label', row 2" in msg and "no row has label 2" in msg, msg
    assert list(ray_tmp.iterdir()) == []  # the command's own Ray would have made its temp dir here
    assert not (tmp_path / "out" / "teachers").exists()
