"""The embed stage on a real local Ray: its tasks write shards equal to a direct forward."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kd.orchestration import pipeline
from ensemble_kd.storage.artifacts import ShardIndex, read_index
from ensemble_kd.cli import main
from ensemble_kd.training.data import DistillData
from ensemble_kd.storage.shards import Shard, ShardMismatchError, ShardSet
from ensemble_kd.storage.teacher_checkpoint import load_teacher
from ensemble_kd.blocks.views import apply_view
from modalities import build_dataset
from tests.helpers import by_key, embed, teacher_set, tiny_config, wait_for_cpus


def _results(cfg, paths, logs=None):
    return by_key(embed(cfg, paths, log=(logs.append if logs is not None else lambda m: None)))


@pytest.fixture(scope="module")
def embedded(ray_cluster, trained):
    cfg, paths = trained
    return cfg, paths, _results(cfg, paths)


def test_shard_values_equal_direct_forward(embedded):
    cfg, paths, res = embedded
    assert set(res) == {(t, s) for t in ("pix_cnn", "kar_mlp") for s in ("train", "test")}
    for (name, split), r in res.items():
        assert not r.reused
        s = Shard(r.dir, verify=True)
        ds = build_dataset("uci-mfeat", split)
        t = load_teacher(paths[name])
        assert s.num_rows == len(ds)
        assert torch.equal(s.sample_ids, torch.from_numpy(ds.sample_ids)) and torch.equal(s.labels, torch.from_numpy(ds.labels))
        with torch.no_grad():
            emb, logits = t.model(ds.get_batch(np.arange(len(ds)), [t.modality])["inputs"][t.modality])
        torch.testing.assert_close(s.embeddings, emb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.logits, logits, rtol=1e-5, atol=1e-5)
        assert s.manifest["key"]["checkpoint_sha256"] == t.content_hash
    # teachers of one split are row-aligned and join
    ss = ShardSet.open([res[("pix_cnn", "train")].dir, res[("kar_mlp", "train")].dir])
    assert ss.teachers == ["pix_cnn", "kar_mlp"] and len(ss) == 1500
    # the stage's artifact is recorded where the next verb finds it
    index = ShardIndex.from_dict(read_index(cfg.output_dir, "shards", "embed"))
    assert index.dirs("train", ["kar_mlp", "pix_cnn"]) == {"kar_mlp": res[("kar_mlp", "train")].dir,
                                                           "pix_cnn": res[("pix_cnn", "train")].dir}


def test_rerun_reuses_and_says_so(embedded):
    cfg, paths, first = embedded
    logs = []
    again = _results(cfg, paths, logs)
    assert all(r.reused for r in again.values())
    assert {r.dir for r in again.values()} == {r.dir for r in first.values()}
    assert sum("reused" in m for m in logs) == 4


def test_tampered_manifest_is_refused_naming_both_sides(embedded, tmp_path):
    cfg, paths, res = embedded
    d = Path(res[("kar_mlp", "test")].dir)
    mf = d / "manifest.json"
    orig = mf.read_text()
    m = json.loads(orig)
    m["key"]["dataset_fingerprint"] = "0" * 64
    mf.write_text(json.dumps(m))
    try:
        with pytest.raises(ShardMismatchError, match=r"dataset_fingerprint: manifest has '0{64}', this run expects '[0-9a-f]{64}'"):
            _results(cfg, paths)
    finally:
        mf.write_text(orig)


def test_truncated_shard_is_rewritten_not_reused(embedded):
    cfg, paths, res = embedded
    part = Path(res[("pix_cnn", "test")].dir) / "part-00000.arrow"
    orig = part.read_bytes()
    part.write_bytes(orig[: len(orig) // 2])
    logs = []
    try:
        again = _results(cfg, paths, logs)
        assert not again[("pix_cnn", "test")].reused and again[("kar_mlp", "test")].reused
        assert any("rewriting" in m and str(part) in m for m in logs), logs
        assert part.read_bytes() == orig  # the same teacher writes the same bytes again
    finally:
        part.write_bytes(orig)


def test_replayed_views_equal_stored_views(ray_cluster, trained, tmp_path):
    base, paths = trained
    cfg = tiny_config(base.output_dir, **{"embed.splits": ["test"], "embed.views": {"num_views": 3, "crop_padding": 2, "flip": True, "seed": 7}})
    res = _results(cfg, paths)
    s = Shard(res[("pix_cnn", "test")].dir)
    ds = build_dataset("uci-mfeat", "test")
    assert s.num_rows == 3 * len(ds)
    v = s.views
    assert (v["view"].reshape(-1, 3) == torch.arange(3)).all()  # sample-major: views 0,1,2 of each sample
    assert v["flip"].any() and (v["top"][v["view"] == 0] == 2).all()
    # the student's pipeline: join by sample_id, replay the stored view, and get the teacher's exact input
    pos = ds.positions_of(s.sample_ids.numpy())
    x = ds.get_batch(pos, ["pix"])["inputs"]["pix"]
    x = apply_view(x, v["top"], v["left"], v["flip"], pad=2)
    t = load_teacher(paths["pix_cnn"])
    with torch.no_grad():
        emb, logits = t.model(x)
    torch.testing.assert_close(s.embeddings, emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.logits, logits, rtol=1e-5, atol=1e-5)
    # the training pipeline (DistillData) hands the student that same replayed view, row by row
    dd = DistillData(ds, "pix", {"pix_cnn": res[("pix_cnn", "test")].dir, "kar_mlp": res[("kar_mlp", "test")].dir})
    rows = torch.tensor([0, 1, 2, 301, 1499])
    got = dd.batch(rows, torch.device("cpu"))
    assert torch.equal(got["x"], x[rows]) and torch.equal(got["index"], rows)
    torch.testing.assert_close(got["teacher_emb"]["pix_cnn"], s.embeddings[rows])
    clean = Shard(_results(tiny_config(base.output_dir, **{"embed.splits": ["test"]}), paths)[("pix_cnn", "test")].dir)
    assert not torch.allclose(s.embeddings[v["view"] == 1], clean.embeddings)  # augmented views differ from clean
    # the vector teacher of the same ensemble keeps identity views and stays row-aligned
    k = Shard(res[("kar_mlp", "test")].dir)
    assert torch.equal(k.sample_ids, s.sample_ids) and not k.views["flip"].any()


def test_cli_inspect_prints_json(embedded, capsys):
    cfg, _, _ = embedded
    assert main(["shards", "inspect", str(cfg.shard_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["teachers"]) >= {"pix_cnn", "kar_mlp"}
    s = next(x for x in info["shards"] if x["teacher"]["name"] == "kar_mlp" and x["dataset"]["split"] == "train" and x["views"]["num_views"] == 1)
    assert s["rows"] == 1500 and s["teacher"]["embed_dim"] == 32 and s["teacher"]["num_classes"] == 10
    assert main(["shards", "inspect", str(cfg.output_dir) + "/nope"]) == 2


def test_more_teachers_than_free_slots_finish(ray_cluster, trained, tmp_path):
    """3 tasks of 2 CPUs on a 4-CPU Ray: the third starts when the first ends."""
    base, paths = trained
    shutil.copytree(base.checkpoint_dir, tmp_path / "teachers")
    shutil.copy(paths["kar_mlp"], tmp_path / "teachers" / "kar_b.pt")
    teachers = [dict(name=n, checkpoint=str(tmp_path / "teachers" / f"{f}.pt"), modality=m)
                for n, f, m in (("pix_cnn", "pix_cnn", "pix"), ("kar_mlp", "kar_mlp", "kar"), ("kar_b", "kar_b", "kar"))]
    cfg = tiny_config(tmp_path, teachers=teachers, **{"embed.splits": ["test"], "embed.cpus_per_actor": 2})
    res = _results(cfg, {t["name"]: tmp_path / "teachers" / f"{t['name']}.pt" for t in teachers})
    assert sorted(t for t, _ in res) == ["kar_b", "kar_mlp", "pix_cnn"] and not any(r.reused for r in res.values())


def test_a_failing_teacher_fails_the_stage_and_stops_the_other_tasks(ray_cluster, trained, tmp_path):
    """One teacher's task fails (its file changed after the teacher set was made): the stage raises
    that error, naming the file; the other teacher's task is cancelled if it still runs, so every
    CPU is free again; nothing of the failed teacher is published."""
    import ray

    base, paths = trained
    shutil.copytree(base.checkpoint_dir, tmp_path / "teachers")
    shutil.copy(paths["kar_mlp"], tmp_path / "teachers" / "kar_b.pt")
    files = {"pix_cnn": tmp_path / "teachers" / "pix_cnn.pt", "kar_b": tmp_path / "teachers" / "kar_b.pt"}
    ts = teacher_set(files)
    shutil.copy(paths["pix_cnn"], files["kar_b"])  # other weights than the set recorded
    cfg = tiny_config(tmp_path, **{"embed.splits": ["train"], "embed.cpus_per_actor": 2, "embed.views.num_views": 8})
    total = ray.cluster_resources()["CPU"]
    with pytest.raises(Exception, match="kar_b.pt.*changed since"):
        pipeline.embed(cfg, ts, progress=False, log=lambda m: None)
    wait_for_cpus(total)
    assert not list(tmp_path.glob("shards/kar_b__*"))  # (a failed writer's temp folder starts with ".")
