"""Every mistake caught before any work: each refused in one line (`ensemble-kd: error: ...`, exit 2)
before Ray starts or anything is written, for every dataset.

A modality a dataset lacks (teachers.N.modality, distill.student.modality, distill.eval_data,
select.teacher_data) is refused for every dataset, not only the shipped ones: a table reports its
modalities from its schema (the rows are not read), synthetic from its options, paired-folder from
its sub-folders. Then the small ones: `--version`, YAML syntax errors, `--set` mistakes, an empty
config, `shards inspect OUTDIR`, `config show` keeping paths as given, `data prepare` saying
`reused`. The command runs for real: in a subprocess where the time or the absence of any output
matters, else in this process (``cli.main``); configs are loaded for real."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import ensemble_kd
from ensemble_kd.cli import main
from ensemble_kd.core.config import ConfigError, from_dict, load_config
from ensemble_kd.orchestration.checks import check_config, dataset_modalities
from tests.helpers import refused_here
from ensemble_kd.core.config import DataConfig

REPO = Path(__file__).resolve().parents[1]

# the README's "Your own data: a table" config, as written there
README_CONFIG = """\
name: my-data
data: {name: table, root: samples.parquet}     # or an .arrow file, or a folder of them
teachers:
  - {name: spectrum_mlp, arch: mlp, modality: spectrum, epochs: 20}
distill:
  teachers: [spectrum_mlp]
  student: {arch: cnn_small, modality: image}
run:
  arms:
    - {name: student-ce, teachers: none, losses: [{name: ce}]}
    - {name: kd, teachers: all, losses: [{name: ce}, {name: kd}]}
"""


def readme_table(n: int = 300) -> pa.Table:
    """The README's table: sample_id, label, split, `spectrum` (16 floats), `image` (1x8x8 uint8)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)  # (N,)
    spectra = rng.normal(size=(n, 16)).astype("float32")  # (N, 16)
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)  # (N, C, H, W)
    t = pa.table({"sample_id": np.arange(n), "label": labels, "split": np.where(np.arange(n) % 5 == 0, "test", "train")})
    t = t.append_column("spectrum", pa.FixedSizeListArray.from_arrays(pa.array(spectra.ravel()), 16))
    return t.append_column("image", pa.FixedShapeTensorArray.from_numpy_ndarray(images))


@pytest.fixture
def table_dir(tmp_path):
    """A folder with the README's samples.parquet and my.yaml."""
    pq.write_table(readme_table(), tmp_path / "samples.parquet")
    (tmp_path / "my.yaml").write_text(README_CONFIG)
    return tmp_path


def cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """The real command in a subprocess; (its result, its wall time in seconds)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300, cwd=cwd)
    return r, time.perf_counter() - t0


def refused(r: subprocess.CompletedProcess) -> str:
    """The error of a refused command: exit 2, no traceback, stderr ends with the error."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith("ensemble-kd: error: "), r.stderr[-3000:]
    return r.stderr[len("ensemble-kd: error: "):]


# ---------------------------------------------------------------------------------------------
# A. a modality the dataset lacks, for every dataset, before any work
# ---------------------------------------------------------------------------------------------
def test_run_on_a_table_refuses_a_student_modality_it_lacks_before_any_work(table_dir):
    out = table_dir / "out"
    r, seconds = cli("run", "--config", "my.yaml", "--out", str(out), "--set", "distill.student.modality=imag",
                     cwd=table_dir)
    msg = refused(r)
    assert "distill.student.modality: dataset 'table' has no modality 'imag'; it has: spectrum, image" in msg, msg
    assert "my.yaml" in msg
    assert not out.exists()  # nothing prepared, trained or written: the data store is not there either
    assert seconds < 30, seconds  # (about 6 s on 2 cores, nearly all of it imports)


def test_table_teacher_modality_is_checked_from_the_schema_alone(table_dir, capsys):
    code = main(["config", "show", "--config", str(table_dir / "my.yaml"),
                 "--set", f"data.root={table_dir / 'samples.parquet'}", "--set", "teachers.0.modality=spectra"])
    msg = capsys.readouterr().err
    assert code == 2 and msg.startswith(f"ensemble-kd: error: invalid config {table_dir / 'my.yaml'}:"), msg
    assert "teachers.0.modality: dataset 'table' has no modality 'spectra'; it has: spectrum, image" in msg, msg


def test_table_modalities_come_from_any_format_and_the_chosen_columns(table_dir):
    t = readme_table()
    with pa.OSFile(str(table_dir / "file.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    with pa.OSFile(str(table_dir / "stream.arrows"), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t)
    folder = table_dir / "parts"
    folder.mkdir()
    pq.write_table(t, folder / "a.parquet")
    for root in ("samples.parquet", "file.arrow", "stream.arrows", "parts"):
        assert dataset_modalities(DataConfig(name="table", root=str(table_dir / root))) == ("spectrum", "image"), root
    picked = DataConfig(name="table", root=str(table_dir / "samples.parquet"), kwargs={"modalities": ["image"]})
    assert dataset_modalities(picked) == ("image",)
    # a source that cannot be read now is not judged here: building it reports that, naming the file
    assert dataset_modalities(DataConfig(name="table", root=str(table_dir / "missing.parquet"))) is None


def test_synthetic_modalities_come_from_its_options(tmp_path):
    cfg = tmp_path / "syn.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"name": "synthetic", "kwargs": {"rows": 200, "modalities": {"vec": [8], "img": [1, 8, 8]}}},
        "teachers": [{"name": "v", "arch": "mlp", "modality": "vec", "epochs": 1}],
        "distill": {"teachers": ["v"], "student": {"arch": "mlp", "modality": "imag"}, "losses": [{"name": "ce"}, {"name": "kd"}]},
    }, sort_keys=False))
    r, seconds = cli("run", "--config", str(cfg), "--out", str(tmp_path / "out"), cwd=tmp_path)
    msg = refused(r)
    assert "distill.student.modality: dataset 'synthetic' has no modality 'imag'; it has: vec, img" in msg, msg
    assert not (tmp_path / "out").exists() and seconds < 30, seconds
    # without options, the default modalities
    assert dataset_modalities(DataConfig(name="synthetic")) == ("vec", "img")


def test_eval_data_and_select_teacher_data_are_checked_for_every_dataset(table_dir):
    syn = {"name": "synthetic", "kwargs": {"modalities": {"other": [4]}}}
    base = {"data": {"name": "synthetic"},
            "teachers": [{"name": "v", "arch": "mlp", "modality": "vec"}],
            "distill": {"student": {"arch": "mlp", "modality": "vec"}}}
    with pytest.raises(ConfigError) as e:
        check_config(from_dict({**base, "distill": {**base["distill"], "eval_data": syn}}))
    assert "distill.eval_data: dataset 'synthetic' has no modality 'vec' (the student's); it has: other" in str(e.value)
    table = {"name": "table", "root": str(table_dir / "samples.parquet")}
    with pytest.raises(ConfigError) as e:
        check_config(from_dict({**base, "select": {"teacher_data": table}}))
    assert ("select.teacher_data: dataset 'table' has no modality 'vec' (of teachers.0); it has: spectrum, image"
            in str(e.value)), str(e.value)


def test_paired_folder_modalities_are_its_sub_folders(tmp_path):
    for m in ("rgb", "depth"):
        (tmp_path / "pf" / m / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        check_config(from_dict({"data": {"name": "paired-folder", "root": str(tmp_path / "pf")},
                                "distill": {"student": {"arch": "mlp", "modality": "ir"}}}))
    assert "distill.student.modality: dataset 'paired-folder' has no modality 'ir'; it has: depth, rgb" in str(e.value)


# ---------------------------------------------------------------------------------------------
# C. the small ones
# ---------------------------------------------------------------------------------------------
def test_version(tmp_path):
    r, _ = cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"ensemble-kd {ensemble_kd.__version__}", (r.stdout, r.stderr)


def test_yaml_syntax_errors_name_the_file_and_line_and_a_tab_says_use_spaces(tmp_path, capsys):
    tab = tmp_path / "tab.yaml"
    tab.write_text("name: x\ndistill:\n\tepochs: 3\n")
    msg = refused_here(capsys, "config", "show", "--config", str(tab))
    assert msg.startswith(f"config {tab}, line 3, column 1: not valid YAML:") and "spaces" in msg, msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nteachers: [a, b\n")
    msg = refused_here(capsys, "config", "show", "--config", str(bad))
    assert msg.startswith(f"config {bad}, line 3,") and "line 2" in msg and "spaces" not in msg, msg


def test_an_unknown_key_from_set_names_the_set_and_the_closest_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    msg = refused_here(capsys, "config", "show", "--config", str(cfg), "--set", "distil.epochs=3")
    assert msg == "--set distil.epochs=3: unknown key 'distil'; did you mean 'distill'?", msg
    # in the file, the file is named, with the closest key
    cfg.write_text("distill: {epoch: 3}\n")
    code = main(["config", "show", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and str(cfg) in err and "distill.epoch: unknown key (got 3); did you mean 'epochs'?" in err, err


def test_set_of_a_loss_the_config_lacks_names_the_losses(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teachers: [{name: t, arch: mlp, modality: kar}]\n"
                   "distill: {teachers: [t], losses: [{name: ce}, {name: kd}]}\n")
    msg = refused_here(capsys, "config", "show", "--config", str(cfg), "--set", "distill.losses.crd.kwargs.tau=0.1")
    assert msg == ("--set distill.losses.crd.kwargs.tau=0.1: distill.losses has no item 'crd': no loss is named 'crd'; "
                   "losses: ce, kd"), msg
    # a config that does not give distill.losses at all: the default's list (ce), not a pydantic tuple error
    cfg.write_text("name: x\n")
    msg = refused_here(capsys, "config", "show", "--config", str(cfg), "--set", "distill.losses.crd.kwargs.tau=0.1")
    assert msg.endswith("no loss is named 'crd'; losses: ce") and "tuple" not in msg, msg
    assert load_config(cfg, {"distill.losses.ce.weight": 2.0}).distill.losses[0].weight == 2.0  # (and it can be set)


def test_an_empty_config_is_refused_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# nothing yet\n\n")
    msg = refused_here(capsys, "config", "show", "--config", str(cfg))
    assert msg.startswith(f"config {cfg} is empty"), msg


def test_an_unknown_loss_says_known_losses(capsys):
    code = main(["config", "show", "--set", "distill.losses.0.name=crdd"])
    err = capsys.readouterr().err
    assert code == 2 and "Known losses: " in err and "losss" not in err, err


def test_shards_inspect_of_an_output_folder_looks_in_its_shards(tmp_path, capsys):
    from ensemble_kd.storage.shards import ShardKey, ShardWriter

    out = tmp_path / "out"
    key = ShardKey(teacher="t1", checkpoint_sha256="c" * 64, dataset="toy", split="train", dataset_fingerprint="f" * 64,
                   views={"num_views": 1}, embedding_dtype="float32")
    n, g = 10, np.random.default_rng(0)
    with ShardWriter(out / "shards", key, 4, 3, 1000) as w:
        w.write(sample_id=np.arange(n), label=np.arange(n) % 3, view=np.zeros(n), aug_top=np.zeros(n),
                aug_left=np.zeros(n), aug_flip=np.zeros(n, bool), embedding=g.normal(size=(n, 4)).astype(np.float32),
                logits=g.normal(size=(n, 3)).astype(np.float32))
        w.close(num_samples=n, dataset_name="toy")
    (out / "data").mkdir()
    assert main(["shards", "inspect", str(out)]) == 0
    info = yaml.safe_load(capsys.readouterr().out)  # (JSON is YAML)
    assert info["num_shards"] == 1 and info["teachers"] == ["t1"] and info["root"] == str(out / "shards"), info


def test_config_show_keeps_output_dir_as_given(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("name: x\noutput_dir: runs/here\ndata: {name: uci-mfeat}\n")
    assert main(["config", "show", "--config", "c.yaml"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["output_dir"] == "runs/here"
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == "outputs"  # the embedded default's, as written
    assert main(["config", "show", "--config", "c.yaml", "--set", "output_dir=elsewhere"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == "elsewhere"
    # what everything else loads is still absolute (Ray workers run in other folders)
    assert load_config(tmp_path / "c.yaml").output_dir == str(tmp_path / "runs" / "here")
    assert from_dict(shown).output_dir == str(tmp_path / "runs" / "here")  # and the printed one means the same here


def test_data_prepare_says_reused_for_a_split_already_stored(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "prepare", "--out", str(out)]) == 0
    first = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("uci-mfeat/")]
    assert [ln.split(":")[0] for ln in first] == ["uci-mfeat/train", "uci-mfeat/test"], first
    assert all(ln.endswith("(written)") for ln in first), first
    assert main(["data", "prepare", "--out", str(out)]) == 0
    again = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("uci-mfeat/")]
    assert again == [ln.replace("(written)", "(reused)") for ln in first], again
