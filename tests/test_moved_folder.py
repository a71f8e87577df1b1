"""Output folders that can be moved or copied.

The index files record the paths of the folder's own files relative to it, summary.json names the
folder it was written in, and the folder's own MLflow store follows the folder: after
`mv out out2` (or `cp -r out out2`) every command on `out2` works there and opens nothing under
`out`, whether `out` is gone, is another folder by now, or is the original still in use. That
last claim is checked with inotify on everything under the old path: it reports every open,
read, write and creation there by any process (the Ray workers included), so a test passes only
if nothing at all touched the old folder. Real Ray (the session's), real MLflow SQLite stores,
the CLI in this process."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sqlite3
import struct
from pathlib import Path

import pytest
import torch

from ensemble_kd.storage import mlflow_store
from ensemble_kd.storage.artifacts import (ShardIndex, StudentRun, TeacherRecord, TeacherSet, read_index, summary_store,
                                           write_index)
from ensemble_kd.cli import main
from ensemble_kd.core.config import to_yaml
from tests.helpers import distill_cfg, out_with_teachers

# one module fixture (a tiny run) per suite, not one per xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_moved_folder")]

ARM = "kd-all"
PARTIAL = "partial"  # a distillation stopped after 1 of 2 epochs, that `distill --resume` continues
INDEXES = ("teachers", "shards", "distill")


# -- inotify: who opens what under a folder ---------------------------------------------------

_IN_ALL = 0xFFF  # access, modify, attrib, close, open, moved from/to, create, delete, delete/move self
_libc = ctypes.CDLL(None, use_errno=True)


class FolderWatch:
    """Every event under ``root`` (each folder in it watched: opens, reads, writes, creations,
    deletions), by any process, until :meth:`close`. Linux inotify through libc."""

    def __init__(self, root: Path) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.dirs: dict[int, Path] = {}
        for d, _, _ in os.walk(root):
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(d), _IN_ALL)
            assert wd >= 0, (d, os.strerror(ctypes.get_errno()))
            self.dirs[wd] = Path(d)
        self.events()  # the walk's own opens of the folders watched so far

    def events(self) -> list[tuple[str, int]]:
        """(path, inotify mask) of each event since the last call."""
        out = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            i = 0
            while i < len(buf):
                wd, mask, _cookie, n = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + n].rstrip(b"\0").decode(errors="replace")
                out.append((str(self.dirs.get(wd, Path("?")) / name), mask))
                i += 16 + n

    def close(self) -> None:
        os.close(self.fd)


def tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Relative path -> (size, mtime ns, bytes) of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_decoy(src: Path, dest: Path) -> None:
    """Another folder at ``dest`` with ``src``'s names and sizes and none of its content: every
    byte inverted, so that a command that read anything in it would fail (a shard's sha256, a
    checkpoint, the MLflow database)."""
    shutil.copytree(src, dest)
    for p in dest.rglob("*"):
        if p.is_file():
            raw = p.read_bytes()
            p.write_bytes(bytes(b ^ 0xFF for b in raw) if raw else b"\xff")


# -- the folder ---------------------------------------------------------------------------------

def config(out: Path):
    """The tiny distillation (CE + KD + CRD from both teachers, 2 epochs) with MLflow on, as one arm
    of `ensemble-kd run` (seed 0, exported at the end)."""
    return distill_cfg(out, **{"name": "moved", "tracking.enabled": True, "run.seeds": [0],
                               "run.arms": [{"name": ARM, "teachers": "all"}],
                               "tune.cpus_per_trial": 0.5, "tune.max_concurrent_trials": 1})


@pytest.fixture(scope="module")
def made(ray_cluster, trained, shard_cache, tmp_path_factory):
    """An output folder as a user leaves it: `ensemble-kd run` (teachers and shards reused from
    copies, one arm, its summary, its export, its MLflow runs and logged model), then a `distill`
    stopped after its first epoch. Returns (folder, config file kept outside it)."""
    out = out_with_teachers(trained, tmp_path_factory, "moved-out", shards_from=shard_cache)
    p = tmp_path_factory.mktemp("moved-config") / "moved.yaml"
    p.write_text(to_yaml(config(out)))
    assert main(["run", "--config", str(p), "--no-progress"]) == 0
    assert main(["distill", "--config", str(p), "--no-progress", "--set", "distill.epochs=1",
                 "--set", f"distill.run_name={PARTIAL}"]) == 0
    return out, p


def db_rows(db: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        return c.execute(sql).fetchall()


def artifact_locations(db: Path) -> list[str]:
    """Every artifact location the store records: its experiments' (but MLflow's own Default, which
    nothing logs into), its runs', its logged models'."""
    return [r[0] for r in db_rows(db, "SELECT artifact_location FROM experiments WHERE name != 'Default' "
                                      "UNION ALL SELECT artifact_uri FROM runs "
                                      "UNION ALL SELECT artifact_location FROM logged_models")]


# -- what is recorded ---------------------------------------------------------------------------

def test_the_folder_records_its_own_files_relative_to_itself(made):
    """The index files name no absolute path of the folder, only paths inside it; summary.json
    names the folder it was written in (how a later command tells that it was moved); the MLflow
    experiments this package made beside the database are tagged so."""
    out, _ = made
    for name in INDEXES:
        text = (out / "index" / f"{name}.json").read_text()
        assert str(out) not in text, (name, text)
    raw = {n: json.loads((out / "index" / f"{n}.json").read_text()) for n in INDEXES}
    assert {t["name"]: t["path"] for t in raw["teachers"]["teachers"]} == {
        "pix_cnn": "teachers/pix_cnn.pt", "kar_mlp": "teachers/kar_mlp.pt"}
    assert sorted(s["dir"].split("/")[0] for s in raw["shards"]["shards"]) == ["shards", "shards"]
    assert raw["distill"]["student_path"] == f"students/{PARTIAL}/student.pt"
    assert raw["distill"]["checkpoint_dir"] == f"ray_results/{PARTIAL}"
    # read back, they are absolute in this folder again
    run = StudentRun.from_dict(read_index(out, "distill", "distill"))
    assert run.student_path == str(out / "students" / PARTIAL / "student.pt") and Path(run.student_path).is_file()
    assert all(Path(s.dir).parent == out / "shards" for s in ShardIndex.from_dict(read_index(out, "shards", "embed")))
    assert json.loads((out / "summary.json").read_text())["output_dir"] == str(out)
    tagged = db_rows(out / "mlflow.db", f"SELECT e.name FROM experiments e JOIN experiment_tags t ON "
                                        f"t.experiment_id = e.experiment_id AND t.key = '{mlflow_store.BESIDE_STORE_TAG}'")
    assert [r[0] for r in tagged] == ["moved"]  # (the teachers were reused: no teachers' experiment)


def test_paths_outside_the_folder_stay_as_given_and_old_indexes_still_load(tmp_path):
    """A user's teacher file outside the folder is recorded absolute; an index written before
    paths were relative (absolute throughout) loads as it did in its own folder, and in a folder
    moved since, reads the folder's own files from the new place (the old one still there or not),
    but a teacher file from there only when the recorded one is gone."""
    old, new = tmp_path / "old", tmp_path / "new"
    mine = tmp_path / "elsewhere" / "teachers" / "t.pt"  # a user's file, in a folder named teachers
    for root in (old, new):
        (root / "shards" / "a__train__1").mkdir(parents=True)
        (root / "teachers").mkdir()
        (root / "teachers" / "own.pt").write_bytes(b"x")
        (root / "teachers" / "t.pt").write_bytes(b"x")
    (old / "shards" / "b__train__2").mkdir()  # only in the old folder
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"x")

    rec = lambda name, path: TeacherRecord(name, str(path), "mlp", "kar", "h")
    write_index(new, "teachers", TeacherSet({"own": rec("own", new / "teachers" / "own.pt"),
                                             "t": rec("t", mine)}).to_dict())
    assert [t["path"] for t in json.loads((new / "index" / "teachers.json").read_text())["teachers"]] == [
        "teachers/own.pt", str(mine)]
    assert TeacherSet.from_dict(read_index(new, "teachers", "teachers train")).paths() == {
        "own": new / "teachers" / "own.pt", "t": mine}

    def legacy(root: Path, name: str, payload: dict) -> None:  # as written before: absolute paths
        (root / "index").mkdir(exist_ok=True)
        (root / "index" / f"{name}.json").write_text(json.dumps({"format": "ensemble-kd/index", "version": 1, **payload}))

    shards = {"shards": [{"teacher": "a", "split": "train", "dir": str(old / "shards" / "a__train__1"), "shard_id": "1",
                          "rows": 3}, {"teacher": "b", "split": "train", "dir": str(old / "shards" / "b__train__2"),
                                       "shard_id": "2", "rows": 3}]}
    teachers = {"teachers": [{"name": n, "path": str(p), "arch": "mlp", "modality": "kar", "content_hash": "h"}
                             for n, p in (("own", old / "teachers" / "own.pt"), ("t", mine))]}
    for root in (old, new):
        legacy(root, "shards", shards)
        legacy(root, "teachers", teachers)
    assert ShardIndex.from_dict(read_index(old, "shards", "embed")).dirs("train") == {
        "a": str(old / "shards" / "a__train__1"), "b": str(old / "shards" / "b__train__2")}  # as before
    assert ShardIndex.from_dict(read_index(new, "shards", "embed")).dirs("train") == {
        "a": str(new / "shards" / "a__train__1"),  # here, though the old one exists
        "b": str(old / "shards" / "b__train__2")}  # not here: as recorded
    assert TeacherSet.from_dict(read_index(new, "teachers", "teachers train")).paths() == {
        "own": old / "teachers" / "own.pt", "t": mine}  # recorded files that exist stay
    (old / "teachers" / "own.pt").unlink()
    assert TeacherSet.from_dict(read_index(new, "teachers", "teachers train")).paths()["own"] == new / "teachers" / "own.pt"
    # written again by a stage, the old index becomes relative
    write_index(new, "shards", ShardIndex.from_dict(read_index(new, "shards", "embed")).to_dict())
    assert [s["dir"] for s in json.loads((new / "index" / "shards.json").read_text())["shards"]] == [
        "shards/a__train__1", str(old / "shards" / "b__train__2")]


def test_a_summary_names_its_store_in_the_folder_it_is_in_now(tmp_path):
    """summary.json's absolute store URI is re-rooted only when it lay inside the folder the summary
    was written in and that folder is not the one it is in now; a store elsewhere stays."""
    old, new = tmp_path / "old", tmp_path / "new"
    own = {"mlflow_tracking_uri": f"sqlite:///{old / 'mlflow.db'}", "output_dir": str(old)}
    assert summary_store(own, old) == own["mlflow_tracking_uri"]  # not moved
    assert summary_store(own, new) == f"sqlite:///{new / 'mlflow.db'}"
    before = {"mlflow_tracking_uri": own["mlflow_tracking_uri"], "plot": str(old / "summary.png")}  # no output_dir yet
    assert summary_store(before, new) == f"sqlite:///{new / 'mlflow.db'}"
    shared = {"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}", "output_dir": str(old)}
    assert summary_store(shared, new) == shared["mlflow_tracking_uri"]  # tracking.uri outside the folder
    server = {"mlflow_tracking_uri": "http://mlflow:5000", "output_dir": str(old)}
    assert summary_store(server, new) == "http://mlflow:5000" and summary_store(None, new) is None


def test_a_moved_store_points_its_artifacts_at_its_new_folder(tmp_path):
    """MLflow records an experiment's artifact location as an absolute URI and copies it into each
    run; after a move the store's experiments made beside it (tagged, or from before the tag with
    their artifacts moved along) point at the new folder, runs included, while an experiment
    whose artifacts live elsewhere keeps its location."""
    old, new = tmp_path / "old store", tmp_path / "new"  # a space: locations are percent-encoded URIs
    uri = f"sqlite:///{old / 'mlflow.db'}"
    eid = mlflow_store.ensure_experiment(uri, "e", old / "mlartifacts")
    legacy = mlflow_store.client(uri).create_experiment("legacy", (old / "mlartifacts" / "legacy").as_uri())  # no tag
    other = mlflow_store.ensure_experiment(uri, "other", tmp_path / "elsewhere" / "mlartifacts")  # a shared store's
    c = mlflow_store.client(uri)
    (tmp_path / "f.txt").write_text("f")
    runs = {e: c.create_run(e).info.run_id for e in (eid, legacy, other)}
    for r in runs.values():
        c.log_artifact(r, str(tmp_path / "f.txt"))
    shutil.move(old, new)
    here = mlflow_store.client(f"sqlite:///{new / 'mlflow.db'}")
    assert here.get_experiment(eid).artifact_location == (new / "mlartifacts" / "e").as_uri()
    assert here.get_experiment(legacy).artifact_location == (new / "mlartifacts" / "legacy").as_uri()
    assert here.get_experiment(other).artifact_location == (tmp_path / "elsewhere" / "mlartifacts" / "other").as_uri()
    for e in (eid, legacy):
        assert here.get_run(runs[e]).info.artifact_uri.startswith((new / "mlartifacts").as_uri() + "/")
        assert [a.path for a in here.list_artifacts(runs[e])] == ["f.txt"]
        fresh = here.create_run(e).info.run_id
        here.log_artifact(fresh, str(tmp_path / "f.txt"))
        assert here.get_run(fresh).info.artifact_uri.startswith((new / "mlartifacts").as_uri() + "/")
    assert not old.exists()  # nothing was written at the old place
    assert mlflow_store.relocate_artifacts(new / "mlflow.db") == []  # done once; a store in place is only read


# -- commands on a moved or copied folder --------------------------------------------------------

def _commands(out2: Path, cfg_file: Path, capsys) -> dict:
    """What a user runs on the moved folder: `distill --resume` (the stopped run continues from its
    state in the new folder), a new `distill` (its shards from the index as the old folder left
    it), `export --arm` (the arm's best run, found through summary.json's store), then `embed`
    (finds every shard; last, since it writes the shard index again). Returns what they left."""
    base = ["--config", str(cfg_file), "--out", str(out2), "--no-progress"]
    assert main(["distill", *base, "--resume"]) == 0
    assert main(["distill", *base, "--set", "distill.run_name=after-move"]) == 0
    onnx = out2 / "exports" / ARM / f"{ARM}.onnx"
    onnx.unlink()  # the one `run` exported: the export below writes it again
    assert main(["export", "--config", str(cfg_file), "--out", str(out2), "--arm", ARM]) == 0
    capsys.readouterr()
    assert main(["embed", *base]) == 0
    embed_out = capsys.readouterr()
    return {"embed": embed_out.out + embed_out.err, "export": onnx}


def _check_in_place(out2: Path, old: Path, before: dict, did: dict) -> None:
    """Everything the commands made or read is in ``out2``."""
    assert did["embed"].count("reused") >= 2 and "wrote" not in did["embed"]
    assert sorted(p.name for p in (out2 / "shards").iterdir()) == before["shards"]  # no shard written again
    assert {p.name: p.read_bytes() for p in (out2 / "teachers").iterdir()} == before["teachers"]  # none retrained
    resumed = torch.load(out2 / "students" / PARTIAL / "student.pt", weights_only=True)["history"]
    assert len(resumed) == 2 and resumed[0] == before["partial_epoch"]  # epoch 1 from the moved state, not rerun
    assert (out2 / "students" / "after-move" / "student.pt").is_file()
    assert did["export"].is_file()
    db = out2 / "mlflow.db"
    locs = artifact_locations(db)
    assert locs and all(loc.startswith((out2 / "mlartifacts").as_uri() + "/") for loc in locs), locs
    assert len(db_rows(db, "SELECT model_id FROM logged_models")) == 2  # the run's export and this one
    c = mlflow_store.client(f"sqlite:///{db}")
    for name in (PARTIAL, "after-move"):  # the runs' artifacts (config, student) went to the new folder
        (run,) = c.search_runs([e.experiment_id for e in c.search_experiments()],
                               f"tags.`{mlflow_store.RUN_NAME_TAG}` = '{name}'")
        assert run.info.status == "FINISHED"
        assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"config.yaml", "student"}
    assert not [loc for loc in locs if str(old) in loc or old.as_uri() in loc]


@pytest.mark.parametrize("old_state", ["gone", "another-folder", "copied"])
def test_a_moved_or_copied_folder_works_in_place_and_opens_nothing_in_the_old_one(made, tmp_path, capsys, old_state):
    """`mv out out2` (the old path then empty, or holding another folder with the same names,
    every byte different) or `cp -r out out2` (the original still there): distill --resume,
    distill, export and embed on out2 work there and open nothing under out (inotify, every process)."""
    out, cfg_file = made
    out2 = tmp_path / "out2"
    shutil.copytree(out, out2)  # the folder as `mv` or `cp -r` leaves it at the new path
    before = {"shards": sorted(p.name for p in (out / "shards").iterdir()),
              "teachers": {p.name: p.read_bytes() for p in (out / "teachers").iterdir()},
              "partial_epoch": torch.load(out / "ray_results" / PARTIAL / "state.pt", weights_only=True)["history"][0]}
    if old_state == "gone" and "output_dir" in json.loads((out2 / "summary.json").read_text()):
        s = json.loads((out2 / "summary.json").read_text())  # a summary from before it named its folder
        del s["output_dir"]
        (out2 / "summary.json").write_text(json.dumps(s))
    kept = out.with_name(out.name + "-kept")
    watch = None
    try:
        if old_state != "copied":
            os.rename(out, kept)  # the original out of the way: `out` itself is what is tested
        if old_state == "another-folder":
            make_decoy(kept, out)
        if old_state != "gone":
            snapshot = tree(out)
            watch = FolderWatch(out)
        did = _commands(out2, cfg_file, capsys)
        if old_state == "gone":
            assert not out.exists()  # nothing was written (or created) at the old path
        else:
            events = watch.events()
            assert events == [], events[:20]
            assert tree(out) == snapshot
            (out / "index" / "distill.json").read_bytes()  # the watch does see an open there
            assert any(p.endswith("distill.json") for p, _ in watch.events())
        _check_in_place(out2, out, before, did)
    finally:
        if watch is not None:
            watch.close()
        if kept.exists():
            shutil.rmtree(out, ignore_errors=True)
            os.rename(kept, out)


def test_ray_train_resume_after_a_move(made, tmp_path, capsys):
    """A run on Ray Train proper (a controller and a worker group, not local mode) keeps its
    checkpoints as Ray Train's snapshot names them (by folder name, relative to the run's folder):
    stopped after one epoch, moved, it resumes from its checkpoint in the new folder."""
    out, cfg_file = made
    src = tmp_path / "out"
    shutil.copytree(out, src)
    rt = ["--config", str(cfg_file), "--no-progress", "--set", "distill.local_mode=false",
          "--set", "distill.run_name=rt", "--set", "tracking.enabled=false"]
    assert main(["distill", *rt, "--out", str(src), "--set", "distill.epochs=1"]) == 0
    (ckpt,) = [p for p in (src / "ray_results" / "rt").glob("checkpoint_*") if p.is_dir()]  # (and the snapshot file)
    first = torch.load(ckpt / "state.pt", weights_only=True)["history"][0]
    out2 = tmp_path / "out2"
    os.rename(src, out2)
    assert main(["distill", *rt, "--out", str(out2)]) == 0
    hist = torch.load(out2 / "students" / "rt" / "student.pt", weights_only=True)["history"]
    assert len(hist) == 2 and hist[0] == first  # epoch 1 from the moved checkpoint
    assert not src.exists()
    rec = json.loads((out2 / "index" / "distill.json").read_text())
    assert rec["checkpoint_dir"].startswith("ray_results/rt/checkpoint_") and rec["student_path"] == "students/rt/student.pt"
