"""A teacher's rows spread over several embed workers (Ray tasks): the shard is the one-worker
shard, row for row and byte for byte; "auto" sizes the workers; a failing worker fails the stage
cleanly. Real Ray (the session's 4 logical CPUs on 2 cores, so workers ask for 0.25 CPU)."""
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kd.orchestration import pipeline
from ensemble_kd.core.config import EmbedConfig
from ensemble_kd.storage.shards import (PartWriter, Shard, ShardKey, ShardWriter, adv_col, emb_col, logit_col, new_temp_dir,
                                        publish_shard)
from ensemble_kd.stages.embed import plan_workers, row_ranges
from tests.helpers import by_key, embed, out_with_teachers, tiny_config, wait_for_cpus

SMALL = {"embed.rows_per_part": 256, "embed.batch_size": 64, "embed.cpus_per_actor": 0.25}  # 24 batches, 6 parts of train


def _run(trained, tmp_path_factory, name: str, **over):
    """The stage on the tiny teachers (copied into a fresh output folder ``name``) with ``over``:
    (results by (teacher, split), log lines)."""
    logs: list[str] = []
    cfg = tiny_config(out_with_teachers(trained, tmp_path_factory, name), **{**SMALL, **over})
    return by_key(embed(cfg, log=logs.append)), logs


def _columns(s: Shard) -> dict[str, torch.Tensor]:
    cols = ["sample_id", "label", "view", "aug_top", "aug_left", "aug_flip", emb_col(s.teacher), logit_col(s.teacher)]
    return {c: s.column(c) for c in cols + ([adv_col(s.teacher)] if s.adv_dim else [])}


def _parts(s: Shard) -> dict[tuple[int, int], str]:
    """(first row, rows) -> sha256 of each part."""
    out, row = {}, 0
    for p in s.manifest["parts"]:
        out[(row, p["rows"])] = p["sha256"]
        row += p["rows"]
    return out


def _assert_same_shard(one: Shard, many: Shard) -> int:
    """Every column equal; the parts on the same rows byte-identical. Returns how many coincide."""
    assert many.dir.name == one.dir.name and many.manifest["shard_id"] == one.manifest["shard_id"]
    assert many.manifest["num_rows"] == one.manifest["num_rows"] and many.manifest["key"] == one.manifest["key"]
    a, b = _columns(one), _columns(many)
    for c in a:
        assert a[c].dtype == b[c].dtype and torch.equal(a[c], b[c]), (many.dir, c)
    p1, pw = _parts(one), _parts(many)
    same = [r for r in pw if r in p1]
    assert all(pw[r] == p1[r] for r in same), (many.dir, p1, pw)
    return len(same)


@pytest.fixture(scope="module")
def by_workers(ray_cluster, trained, tmp_path_factory):
    """{W: (results, logs)} of the stage with 1, 2 and 3 workers per teacher, each in its own folder."""
    return {w: _run(trained, tmp_path_factory, f"w{w}", **{"embed.workers_per_teacher": w}) for w in (1, 2, 3)}


@pytest.mark.parametrize("w", [2, 3])
def test_several_workers_write_the_one_worker_shard(by_workers, w):
    one, _ = by_workers[1]
    many, logs = by_workers[w]
    assert set(many) == set(one) == {(t, s) for t in ("pix_cnn", "kar_mlp") for s in ("train", "test")}
    for k in one:
        s1, sw = Shard(one[k].dir), Shard(many[k].dir)  # opens and verifies every part's sha256
        coinciding = _assert_same_shard(s1, sw)
        n = len(sw.manifest["parts"])
        assert n >= w and n >= len(s1.manifest["parts"])
        assert [p["file"] for p in sw.manifest["parts"]] == [f"part-{i:05d}.arrow" for i in range(n)]  # renamed in row order
        assert any(f"{Path(many[k].dir).name}: wrote {sw.num_rows} rows" in m and f"by {w} workers" in m for m in logs), logs
        if k[1] == "train" or w == 2:  # the ranges fall on part boundaries (a part: 4 batches of 64 rows): all coincide
            assert coinciding == len(s1.manifest["parts"]) == n
    # train, 3 workers on 1500 rows: [0, 512) [512, 1024) [1024, 1500), each two whole parts
    # test, 3 workers on 500 rows: whole parts would give 256 + 244 rows on two workers, so the
    # ranges follow the batches ([0, 128) [128, 320) [320, 500)) and no part coincides
    if w == 3:
        assert len(Shard(many[("kar_mlp", "test")].dir).manifest["parts"]) == 4
    assert not list(Path(many[k].dir).parent.glob(".*"))  # no temp folder left


def test_one_worker_writes_the_parts_a_shard_writer_writes(by_workers, tmp_path):
    """W=1 is the embedded default's path: its parts are those of one ShardWriter fed the same rows
    (the writer the stage used before the ranges), byte for byte."""
    one, _ = by_workers[1]
    s = Shard(one[("pix_cnn", "train")].dir)
    cols = _columns(s)
    m = s.manifest
    key = ShardKey(**m["key"])
    with ShardWriter(tmp_path, key, s.embed_dim, s.num_classes, rows_per_part=256) as w:
        for a in range(0, s.num_rows, 64):
            w.write(*(cols[c][a:a + 64].numpy() for c in cols))
        m2 = w.close(m["dataset"]["num_samples"], m["dataset"]["name"])
    assert [p["sha256"] for p in m2["parts"]] == [p["sha256"] for p in m["parts"]]


def test_adversarial_views_over_two_workers_same_bytes(ray_cluster, trained, tmp_path_factory):
    """GACD shards (2 views + 2 PGD views a sample, each with its delta): two workers give the
    one-worker bytes (the PGD start is drawn per row, not per batch position)."""
    adv = {"embed.splits": ["test"], "embed.views": {"num_views": 2, "crop_padding": 2, "flip": True, "seed": 3},
           "embed.adversarial": {"enabled": True, "num_views": 2, "epsilon": 0.3, "steps": 2, "step_size": 0.15, "seed": 5}}
    one, _ = _run(trained, tmp_path_factory, "adv1", **adv, **{"embed.workers_per_teacher": 1})
    two, logs = _run(trained, tmp_path_factory, "adv2", **adv, **{"embed.workers_per_teacher": 2})
    for k in one:
        s1, s2 = Shard(one[k].dir), Shard(two[k].dir)
        assert s2.adv_dim > 0 and s2.num_rows == 4 * 500
        assert _assert_same_shard(s1, s2) == len(s1.manifest["parts"])  # 16 samples a batch, 64 a part: aligned
    assert sum("by 2 workers" in m for m in logs) == 2, logs


def test_auto_sizes_the_workers_by_rows_and_free_cpus(ray_cluster, trained, tmp_path_factory):
    test = {"embed.splits": ["test"]}  # 500 rows a teacher, 8 batches
    _, logs = _run(trained, tmp_path_factory, "big", **test)  # min_rows_per_worker 50,000: one worker each
    assert sum("wrote 500 rows" in m for m in logs) == 2 and not any("workers" in m for m in logs), logs
    res, logs = _run(trained, tmp_path_factory, "small", **test, **{"embed.min_rows_per_worker": 200})  # 16 free slots: 3 each
    assert sum("wrote 500 rows" in m and "by 3 workers" in m for m in logs) == 2, logs
    assert all(Shard(r.dir).num_rows == 500 for r in res.values())


def test_plan_workers():
    e = EmbedConfig(cpus_per_actor=0.25, min_rows_per_worker=100)
    assert plan_workers(EmbedConfig(), {"a": 2000, "b": 500}, {"CPU": 64.0}) == {"a": 1, "b": 1}  # the default's rows
    assert plan_workers(e, {"a": 2000, "b": 2000}, {"CPU": 4.0}) == {"a": 8, "b": 8}
    assert plan_workers(e, {"a": 2000, "b": 150, "c": 2000}, {"CPU": 4.0}) == {"a": 7, "b": 2, "c": 7}  # b's share goes on
    assert plan_workers(e, {"a": 2000}, {}) == {"a": 1}  # nothing free: still one
    assert plan_workers(EmbedConfig(cpus_per_actor=2, min_rows_per_worker=100), {"a": 500, "b": 500}, {"CPU": 4.0}) == \
        {"a": 1, "b": 1}  # 2 slots for 2 teachers
    gpu = EmbedConfig(gpus_per_actor=1, min_rows_per_worker=1000)
    assert plan_workers(gpu, {"a": 10**6, "b": 10**6, "c": 10**6}, {"CPU": 2.0, "GPU": 32.0}) == {"a": 10, "b": 11, "c": 11}
    assert plan_workers(EmbedConfig(workers_per_teacher=5), {"a": 10}, {"CPU": 1.0}) == {"a": 5}  # an int is taken as is
    with pytest.raises(ValueError, match="workers_per_teacher"):
        EmbedConfig(workers_per_teacher=0)


@pytest.mark.parametrize("n,rps,per_batch,rpp,w", [
    (1500, 1, 64, 256, 2), (1500, 1, 64, 256, 3), (500, 1, 64, 256, 3), (200_000, 1, 512, 65536, 2),
    (1_200_000, 1, 512, 65536, 4), (1500, 3, 170, 700, 2), (10, 1, 512, 65536, 4), (0, 1, 512, 65536, 4),
    (1000, 4, 16, 256, 7)])
def test_row_ranges_cover_the_shard_on_batch_boundaries(n, rps, per_batch, rpp, w):
    r = row_ranges(n, rps, per_batch, rpp, w)
    assert 1 <= len(r) <= w and r[0][0] == 0 and r[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(r, r[1:])) and all(a < b for a, b in r if n)
    assert all(a % per_batch == 0 for a, _ in r)
    even = math.ceil(math.ceil(n / per_batch) / len(r)) * per_batch  # the largest range of batches dealt out evenly
    part_aligned = rpp % rps == 0 and all(a * rps % rpp == 0 for a, _ in r)
    assert max(b - a for a, b in r) <= (1.1 * even if part_aligned else even), r  # balance is never given up for much


def test_row_ranges_pick_part_boundaries_only_when_balanced():
    assert row_ranges(1500, 1, 64, 256, 2) == [(0, 768), (768, 1500)]  # 3 + 3 parts
    assert row_ranges(200_000, 1, 512, 65536, 2) == [(0, 99840), (99840, 200_000)]  # 2 + 2 parts would be 131072 + 68928
    assert row_ranges(1_200_000, 1, 512, 65536, 2) == [(0, 589824), (589824, 1_200_000)]  # 9 + 10 parts
    assert row_ranges(0, 1, 512, 65536, 4) == [(0, 0)] and row_ranges(10, 1, 512, 65536, 4) == [(0, 10)]


def test_part_writers_of_ranges_give_the_whole_shards_parts(tmp_path):
    """No Ray: two part writers over [0, 120) and [120, 250) of a 100-rows-a-part shard, published
    together, make the shard one writer makes: rows equal, the part before 100 and the one after
    200 byte-identical, the part [100, 200) cut in two at the range boundary."""
    g = np.random.default_rng(0)
    n, d, c = 250, 5, 3
    rows = dict(sample_id=np.arange(n), label=np.arange(n) % c, view=np.zeros(n), aug_top=np.zeros(n), aug_left=np.zeros(n),
                aug_flip=np.zeros(n, bool), embedding=g.normal(size=(n, d)).astype(np.float32),
                logits=g.normal(size=(n, c)).astype(np.float32))
    key = ShardKey("t", "c" * 64, "toy", "train", "f" * 64, {"num_views": 1}, "float32")
    with ShardWriter(tmp_path / "one", key, d, c, rows_per_part=100) as w:
        for a in range(0, n, 30):
            w.write(**{k: v[a:a + 30] for k, v in rows.items()})
        m1 = w.close(n, "toy")
    tmp = new_temp_dir(tmp_path / "two", key)
    parts = []
    for i, (a, b) in enumerate([(0, 120), (120, 250)]):
        pw = PartWriter(tmp, key, d, c, 100, first_row=a, name=f"range-{i:05d}-" + "{:05d}.arrow")
        for s in range(a, b, 30):
            pw.write(**{k: v[s:min(s + 30, b)] for k, v in rows.items()})
        parts += pw.close()
    assert [p["rows"] for p in parts] == [100, 20, 80, 50]
    m2 = publish_shard(tmp, tmp_path / "two" / key.dirname, key, d, c, {}, 0, parts, n, "toy")
    assert not tmp.exists() and m2["num_rows"] == n and [p["file"] for p in m2["parts"]][-1] == "part-00003.arrow"
    assert m2["parts"][0]["sha256"] == m1["parts"][0]["sha256"] and m2["parts"][3]["sha256"] == m1["parts"][2]["sha256"]
    s1, s2 = Shard(tmp_path / "one" / key.dirname), Shard(tmp_path / "two" / key.dirname)
    assert all(torch.equal(a, b) for a, b in zip(_columns(s1).values(), _columns(s2).values()))
    assert {k: v for k, v in m1.items() if k not in ("parts", "created")} == \
        {k: v for k, v in m2.items() if k not in ("parts", "created")}


def test_a_failing_worker_fails_the_stage_and_leaves_nothing(ray_cluster, trained, tmp_path):
    """Two workers a teacher; kar_b's file changed after the teacher set was made, so its workers
    fail on load: the stage raises that error naming the file, pix_cnn's workers (started after
    kar_b's, and slow: 32 views, 48,000 rows in parts of 256) are cancelled if they have not finished,
    every CPU comes back, no temp folder stays, and no shard but a whole one of pix_cnn."""
    import ray

    base, paths = trained
    shutil.copytree(base.checkpoint_dir, tmp_path / "teachers")
    shutil.copy(paths["kar_mlp"], tmp_path / "teachers" / "kar_b.pt")
    teachers = [dict(name="kar_b", checkpoint=str(tmp_path / "teachers" / "kar_b.pt"), modality="kar"),  # its tasks start first
                dict(name="pix_cnn", checkpoint=str(tmp_path / "teachers" / "pix_cnn.pt"), modality="pix")]
    cfg = tiny_config(tmp_path, teachers=teachers, **{**SMALL, "embed.splits": ["train"], "embed.views.num_views": 32,
                                                      "embed.workers_per_teacher": 2, "embed.cpus_per_actor": 1})
    ts = pipeline.existing_teachers(cfg)
    shutil.copy(paths["pix_cnn"], tmp_path / "teachers" / "kar_b.pt")  # other weights than the set recorded
    total = ray.cluster_resources()["CPU"]
    with pytest.raises(Exception, match="kar_b.pt.*changed since"):
        pipeline.embed(cfg, ts, progress=False, log=lambda m: None)
    wait_for_cpus(total)
    left = list((tmp_path / "shards").iterdir())
    assert not [p for p in left if p.name.startswith(".")], left  # no temp folder stays
    # On a loaded machine pix_cnn's workers can finish before kar_b's fail: a shard published then is
    # whole (it opens and verifies); kar_b's never is.
    assert all(p.name.startswith("pix_cnn__") and Shard(p).num_rows == 48_000 for p in left), left
