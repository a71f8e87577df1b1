"""The embed stage: Ray tasks stream the dataset through each teacher and write Arrow shards.

A teacher's rows are split over W workers (``embed.workers_per_teacher``; "auto": the cluster's
free room at the stage's start, shared by the teachers with work, at most one per
``embed.min_rows_per_worker`` rows). Each worker is one Ray task (:func:`embed_ranges`) that loads
the frozen teacher once (on a GPU fraction on clusters, a CPU here), reads its row range of every
requested split from the stored dataset itself (so no sample crosses the object store), runs
batched inference and writes that range's part files into the shard's temp folder, which the
driver created. When every range of a shard is done the driver renames the parts in row order,
writes the manifest and publishes the folder atomically (:func:`~ensemble_kd.storage.shards.publish_shard`):
the driver only drains the tasks' generators and renames files, so W workers run W times as fast
as one. A task is a Ray streaming generator: it yields the number of rows done after every batch,
which the driver turns into one progress bar per teacher, then each range's part descriptors.

Why the result is the same as one worker's, byte for byte: ranges start and end on multiples of
the batch's sample count, so every batch holds the same samples as in a one-worker run and goes
through the same kernels; and, when it costs little balance, on part boundaries too, so that
the part files themselves are the one-worker run's (:func:`row_ranges`). One worker (the
embedded default's 2,000 rows) writes exactly the parts it always wrote.

A task holds one teacher for its ranges of all splits and reserves ``embed.cpus_per_actor`` CPUs
and ``embed.gpus_per_actor`` of a GPU while it runs, and runs where that says: on the GPU Ray gave it
when ``gpus_per_actor`` > 0, else on the CPU with the GPUs hidden from it (``devices.stage_device``).
A task with a GPU runs in a fresh process each time (``max_calls=1``). Why tasks rather than actors or Ray Data, with the measurements:
docs/design.md, "Stages and their artifacts".

The stage takes its inputs explicitly (a :class:`~ensemble_kd.storage.artifacts.TeacherSet`, a dataset,
the splits and the embed recipe) and returns a :class:`~ensemble_kd.storage.artifacts.ShardIndex`; the
select stage's callers use it the same way for the pool and the teachers' own test split.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from ensemble_kd.core import layout
from ensemble_kd.blocks.adversarial import pgd_perturb, row_generators
from ensemble_kd.storage.artifacts import ArtifactIndexError, ShardIndex, ShardRecord, TeacherSet, read_index, write_index
from ensemble_kd.core.files import DiskFullError, disk_full_cause
from ensemble_kd.core.config import AdversarialConfig, DataConfig, EmbedConfig, ViewsConfig, to_dict
from ensemble_kd.core.devices import autocast, stage_device
from ensemble_kd.storage.shards import (PartWriter, Shard, ShardCorruptError, ShardKey, check_manifest, discard_shard,
                                        new_temp_dir, publish_shard)
from ensemble_kd.storage.teacher_checkpoint import Teacher, load_record
from ensemble_kd.blocks.views import apply_view, draw_views, view_recipe
from ensemble_kd.storage.datastore import open_split, prepare
from modalities import PairedDataset


def shard_key(teacher: str, checkpoint_sha256: str, ds: PairedDataset, fingerprint: str, recipe: dict[str, Any],
              embedding_dtype: str) -> ShardKey:
    return ShardKey(teacher, checkpoint_sha256, ds.name, ds.split, fingerprint, recipe, embedding_dtype)


@torch.no_grad()
def embed_rows(teacher: Teacher, ds: PairedDataset, positions: np.ndarray, views: ViewsConfig, device: torch.device,
               amp: bool, adversarial: AdversarialConfig | None = None) -> dict[str, np.ndarray]:
    """Teacher outputs for every view of the samples at ``positions``: one shard batch (sample-major).

    With ``adversarial`` enabled each sample gets A more rows after its V normal views: view
    V + a is PGD (against this teacher, ``adversarial.objective``) applied to normal view a % V, with that
    view's crop/flip parameters; the row's ``adv_delta`` is the perturbation that was added
    (zeros on normal rows), and the teacher's outputs are on view + delta.
    """
    b = ds.get_batch(positions, [teacher.modality])
    x = b["inputs"][teacher.modality]  # (B, *shape)
    spec = ds.spec(teacher.modality)
    V = views.num_views
    vp = draw_views(b["sample_id"].numpy(), V, views.crop_padding, views.flip, views.include_clean, views.seed)
    if spec.kind == "image":
        x = x.repeat_interleave(V, dim=0)  # (B*V, C, H, W), sample-major like vp
        x = apply_view(x, torch.from_numpy(vp.top), torch.from_numpy(vp.left), torch.from_numpy(vp.flip), views.crop_padding)
    else:  # no augmentation of vectors: identity views keep rows aligned with image teachers
        x = x.repeat_interleave(V, dim=0)
        vp.top[:], vp.left[:], vp.flip[:] = views.crop_padding, views.crop_padding, False
    A = adversarial.num_views if adversarial is not None and adversarial.enabled else 0
    sample_id, label = np.repeat(b["sample_id"].numpy(), V), np.repeat(b["label"].numpy(), V)  # (B*V,)
    view, top, left, flip = vp.view, vp.top, vp.left, vp.flip
    if A:
        x, delta, (sample_id, label, view, top, left, flip) = _with_adversarial_rows(
            teacher, x, V, A, adversarial, device, sample_id, label, view, top, left, flip)
    with autocast(device, amp):
        emb, logits = teacher.model(x.to(device, non_blocking=True))  # (B*(V+A), d), (B*(V+A), C)
    return {
        "sample_id": sample_id, "label": label,
        "view": view, "aug_top": top, "aug_left": left, "aug_flip": flip,
        "embedding": emb.float().cpu().numpy(),
        "logits": logits.float().cpu().numpy(),
        **({"adv_delta": delta.reshape(delta.shape[0], -1).numpy()} if A else {}),
    }


def _with_adversarial_rows(teacher: Teacher, x: torch.Tensor, V: int, A: int, adv: AdversarialConfig,
                           device: torch.device, *cols: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """Append A PGD rows per sample to the sample-major (B*V, ...) views x and the (B*V,) row
    columns (sample_id, label, view, top, left, flip); returns x (B*(V+A), ...), the float32
    deltas (B*(V+A), ...) (zeros on normal rows) and the columns, still sample-major."""
    B, shape = x.shape[0] // V, x.shape[1:]
    base = torch.arange(A) % V  # (A,) the normal view each adversarial view perturbs
    x_base = x.reshape(B, V, *shape)[:, base].reshape(B * A, *shape).float().cpu()  # (B*A, ...)
    adv_cols = [c.reshape(B, V)[:, base.numpy()].reshape(-1).copy() for c in cols]  # (B*A,) each
    sid, lab, view = adv_cols[0], adv_cols[1], adv_cols[2]
    view[:] = V + np.tile(np.arange(A, dtype=view.dtype), B)  # ids continue after the normal views
    gens = row_generators(adv.seed, sid, view) if adv.random_start else None
    delta = pgd_perturb(teacher.model, x_base.to(device), torch.from_numpy(lab).to(device), adv.epsilon, adv.steps,
                        adv.step_size, gens, adv.random_start, adv.objective).float().cpu()  # (B*A, ...)
    x_adv = x_base + delta  # on the CPU in float32: the very op the student's pipeline replays
    x_all = torch.cat([x.reshape(B, V, *shape).float().cpu(), x_adv.reshape(B, A, *shape)], 1)  # (B, V+A, ...)
    d_all = torch.cat([torch.zeros(B, V, *shape), delta.reshape(B, A, *shape)], 1)  # (B, V+A, ...)
    out = [np.concatenate([c.reshape(B, V), a.reshape(B, A)], 1).reshape(-1) for c, a in zip(cols, adv_cols)]
    return x_all.reshape(B * (V + A), *shape), d_all.reshape(B * (V + A), *shape), out


def rows_per_sample(ecfg: EmbedConfig) -> int:
    """Shard rows per sample: V views + A adversarial views (consecutive: rows are sample-major)."""
    return ecfg.views.num_views + (ecfg.adversarial.num_views if ecfg.adversarial.enabled else 0)


def samples_per_batch(ecfg: EmbedConfig) -> int:
    """Samples per inference batch (``batch_size`` rows, whole samples, at least one)."""
    return max(1, ecfg.batch_size // rows_per_sample(ecfg))


def write_range(teacher: Teacher, ds: PairedDataset, key: ShardKey, folder: Path, ecfg: EmbedConfig,
                device: torch.device, amp: bool, start: int, stop: int, index: int = 0) -> Iterator[int | dict[str, Any]]:
    """Generator: embed samples ``[start, stop)`` of ``ds`` (``start`` a multiple of the batch's
    samples, so the batches are a one-worker run's) into part files ``range-<index>-<j>.arrow`` in
    ``folder`` (the shard's temp folder), cut at the shard's global multiples of ``rows_per_part``;
    yields the rows done after each batch, then ``{"shard", "range", "parts", "meta"}``: the part
    descriptors in row order and what the manifest needs (:func:`~ensemble_kd.storage.shards.publish_shard`)."""
    per_batch, rps = samples_per_batch(ecfg), rows_per_sample(ecfg)
    adv_dim = ds.spec(teacher.modality).numel if rps > ecfg.views.num_views else 0  # adversarial rows carry their delta
    w = PartWriter(folder, key, teacher.embed_dim, teacher.num_classes, ecfg.rows_per_part, adv_dim,
                   first_row=start * rps, name=f"range-{index:05d}-" + "{:05d}.arrow")
    for s in range(start, stop, per_batch):
        rows = embed_rows(teacher, ds, np.arange(s, min(s + per_batch, stop)), ecfg.views, device, amp, ecfg.adversarial)
        w.write(**rows)
        yield len(rows["sample_id"])
    extra = {"arch": teacher.arch, "modality": teacher.modality, "checkpoint_sha256": teacher.content_hash,
             "test_top1": teacher.test_top1}
    yield {"shard": key.dirname, "range": index, "parts": w.close(),
           "meta": {"embed_dim": teacher.embed_dim, "num_classes": teacher.num_classes, "extra": extra,
                    "adv_dim": adv_dim, "num_samples": len(ds), "dataset_name": ds.name}}


def write_shard(teacher: Teacher, ds: PairedDataset, key: ShardKey, root: Path, ecfg: EmbedConfig, device: torch.device,
                amp: bool):
    """Generator: writes one whole shard in this process (one worker), yields rows done after each
    batch, then the manifest. The same parts and manifest as the stage's one-worker path."""
    tmp = new_temp_dir(root, key)
    try:
        for item in write_range(teacher, ds, key, tmp, ecfg, device, amp, 0, len(ds)):
            if isinstance(item, dict):
                yield publish_shard(tmp, Path(root) / key.dirname, key, parts=item["parts"], **item["meta"])
            else:
                yield item
    finally:  # an error, or a consumer that stopped early: no half shard stays
        shutil.rmtree(tmp, ignore_errors=True)


def _open_teacher(teacher: dict[str, Any], data: dict[str, Any], ecfg: dict[str, Any], output_dir: str
                  ) -> tuple[Teacher, DataConfig, EmbedConfig, torch.device]:
    """A task's setup: its threads, device (``gpus_per_actor``'s) and the frozen teacher (checked
    against its record)."""
    ec = EmbedConfig(**ecfg)
    torch.set_num_threads(max(1, int(ec.cpus_per_actor)))  # a pooled worker keeps the last task's setting otherwise
    dev = stage_device(ec.gpus_per_actor, "embed.gpus_per_actor")
    dc = DataConfig(**data)
    return load_record(teacher, open_split(dc, "train", output_dir), dev), dc, ec, dev  # train: the spec and classes


def _open_split(dc: DataConfig, split: str, key: ShardKey, output_dir: str) -> PairedDataset:
    """The stored split, refused when it is not the data the driver planned the shard on."""
    ds = open_split(dc, split, output_dir)
    fp = ds.fingerprint()
    if fp != key.dataset_fingerprint:  # e.g. a cluster node whose copy of the data differs
        raise ValueError(f"dataset {ds.name!r} ({split}) on this node has fingerprint {fp[:16]}, the driver's has "
                         f"{key.dataset_fingerprint[:16]}: the nodes do not see the same data")
    return ds


def embed_ranges(teacher: dict[str, Any], data: dict[str, Any], ecfg: dict[str, Any], output_dir: str,
                 amp: bool, jobs: Sequence[Mapping[str, Any]]):
    """Ray task body of the stage (a streaming generator): load one frozen teacher (a TeacherRecord
    as a dict) once, then for each job ``{split, key, start, stop, index, tmp}`` write samples
    ``[start, stop)`` of that split into the shard's temp folder ``tmp`` (:func:`write_range`);
    yields the rows done after every batch and each range's part descriptors. Publishing is the
    driver's: it alone knows when every range of a shard is there."""
    t, dc, ec, dev = _open_teacher(teacher, data, ecfg, output_dir)
    for job in jobs:
        k = ShardKey(**job["key"])
        ds = _open_split(dc, job["split"], k, output_dir)
        yield from write_range(t, ds, k, Path(job["tmp"]), ec, dev, amp, job["start"], job["stop"], job["index"])


def embed_teacher(teacher: dict[str, Any], data: dict[str, Any], ecfg: dict[str, Any], output_dir: str,
                  amp: bool, jobs: Sequence[tuple[str, dict[str, Any]]]):
    """Ray task body (a streaming generator) writing whole shards in one task, as one worker of the
    stage does (``bench/embed_throughput.py`` times it): load one frozen teacher once, then write
    and publish its shard under ``<output_dir>/shards`` for each job ``(split, shard key)`` in order;
    yields the rows done after every batch and each shard's manifest when it is published."""
    t, dc, ec, dev = _open_teacher(teacher, data, ecfg, output_dir)
    for split, key in jobs:
        k = ShardKey(**key)
        yield from write_shard(t, _open_split(dc, split, k, output_dir), k, layout.shards(output_dir), ec, dev, amp)


def embed_task(ecfg: EmbedConfig, body: Callable[..., Any] = embed_teacher) -> Any:
    """A task body (:func:`embed_ranges`, the stage's; :func:`embed_teacher`) as a Ray remote
    function with the embed config's resources. No retry: a failed teacher is reported, not run
    again. With a GPU, a fresh worker process per task: set here because Ray's own default
    (max_calls=1 for GPU tasks) only follows a ``num_gpus`` given to ``ray.remote``, not to
    ``.options``."""
    return ray.remote(max_calls=1 if ecfg.gpus_per_actor > 0 else 0)(body).options(
        num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor, max_retries=0)


def row_ranges(num_samples: int, rows_per_sample: int, per_batch: int, rows_per_part: int,
               workers: int) -> list[tuple[int, int]]:
    """Split a shard's samples into at most ``workers`` contiguous ranges ``[start, stop)``, one per
    worker, in order. Every boundary is a multiple of ``per_batch`` samples, so each batch holds the
    same samples as in a one-worker run (hence the same bytes from the same kernels). When a part
    holds whole samples, the boundaries are also put on part boundaries (multiples of lcm(batch,
    part) samples), which makes the part files themselves a one-worker run's, unless that leaves
    the largest range more than 10% larger than batch-aligned ranges would (a shard of few parts
    over many workers: the balance, hence the wall time, wins). Fewer ranges than workers when the
    shard has fewer batches; an empty shard is one empty range."""
    def even(unit: int) -> list[tuple[int, int]]:  # blocks of `unit` samples dealt out evenly
        blocks = -(-num_samples // unit)
        w = min(workers, blocks)
        return [(min(num_samples, i * blocks // w * unit), min(num_samples, (i + 1) * blocks // w * unit)) for i in range(w)]

    if num_samples == 0 or workers <= 1:
        return [(0, num_samples)]
    ranges = even(per_batch)
    if rows_per_part % rows_per_sample == 0:
        aligned = even(math.lcm(per_batch, rows_per_part // rows_per_sample))
        if max(b - a for a, b in aligned) <= 1.1 * max(b - a for a, b in ranges):
            return aligned
    return ranges


def plan_workers(ecfg: EmbedConfig, rows: Mapping[str, int], available: Mapping[str, float]) -> dict[str, int]:
    """Workers per teacher (``rows``: each teacher's rows to write). An int
    ``workers_per_teacher`` is taken as is; "auto" deals the free slots of the task's resource
    (``available``, i.e. ``ray.available_resources()``: GPUs with ``gpus_per_actor`` > 0, else CPUs)
    out to the teachers, none more than one per ``min_rows_per_worker`` rows (what a small teacher
    leaves goes to the others), each at least one."""
    if ecfg.workers_per_teacher != "auto":
        return {name: int(ecfg.workers_per_teacher) for name in rows}
    res, need = ("GPU", ecfg.gpus_per_actor) if ecfg.gpus_per_actor > 0 else ("CPU", ecfg.cpus_per_actor)
    free = int(available.get(res, 0.0) / need + 1e-9)
    caps = {name: max(1, -(-r // ecfg.min_rows_per_worker)) for name, r in rows.items()}
    out = {}
    for i, name in enumerate(sorted(caps, key=caps.get)):  # smallest cap first: its unused share goes on
        out[name] = max(1, min(caps[name], free // (len(caps) - i)))
        free = max(0, free - out[name])
    return {name: out[name] for name in rows}


def plan_shards(teachers: TeacherSet, data: DataConfig, splits: Sequence[str], ecfg: EmbedConfig,
                output_dir: str | Path) -> list[tuple[str, str, ShardKey, int]]:
    """(teacher, split, key, number of samples) of every shard: each teacher x each split. Prepares
    the stored splits (the driver's :func:`~ensemble_kd.storage.datastore.prepare`) the tasks will
    read, the train split always (a worker never prepares one)."""
    plan = []
    recipe = view_recipe(ecfg.views, ecfg.adversarial)
    if "train" not in splits:
        prepare(data, "train", output_dir)  # each task reads the teacher's spec and classes from it
    for split in splits:
        ds = prepare(data, split, output_dir)
        fp = ds.fingerprint()
        for name, t in teachers.items():
            if t.modality not in ds.modalities:
                raise ValueError(f"teacher {name!r} reads modality {t.modality!r}, which dataset {ds.name!r} does not have")
            plan.append((name, split, shard_key(name, t.content_hash, ds, fp, recipe, ecfg.embedding_dtype), len(ds)))
    return plan


def run(teachers: TeacherSet, data: DataConfig, splits: Sequence[str], ecfg: EmbedConfig, output_dir: str | Path,
        amp: bool = True, progress: bool = True, log: Callable[[str], None] = print,
        index: str | None = "shards", bar_position: int = 0) -> ShardIndex:
    """Write (or reuse) the shard of every teacher x split; each teacher's rows over its workers'
    Ray tasks (Ray must be initialised). Records the result in ``<output_dir>/index/<index>.json``
    (merged with what is there: other teachers' shards stay), unless ``index`` is None.
    ``bar_position``: the first progress bar's line (runs side by side keep their bars apart)."""
    root = layout.shards(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    results: list[ShardRecord] = []
    todo: dict[str, list[tuple[str, ShardKey, int]]] = {}
    for name, split, key, num_samples in plan_shards(teachers, data, splits, ecfg, output_dir):
        d = root / key.dirname
        if d.exists():
            m = check_manifest(d, key)  # refuses a tampered/mismatched manifest, naming both sides
            try:
                Shard(d)  # sizes, sha256 of every part, schema, rows
            except ShardCorruptError as e:  # damaged bytes: never reused, rewritten from the teacher
                log(f"shard {d.name}: rewriting, the existing one is damaged: {e}")
                discard_shard(d)
            else:
                log(f"shard {d.name}: reused ({m['num_rows']} rows)")
                results.append(ShardRecord(name, split, str(d), key.shard_id, m["num_rows"], True, 0.0))
                continue
        todo.setdefault(name, []).append((split, key, num_samples))
    if todo:
        written = _EmbedTasks(teachers, data, ecfg, Path(output_dir), amp, progress, bar_position).run(todo)
        for r, workers in written:
            log(f"shard {Path(r.dir).name}: wrote {r.rows} rows in {r.seconds:.1f}s" + (f" by {workers} workers" if workers > 1 else ""))
        results += [r for r, _ in written]
    out = ShardIndex(tuple(results))
    if index is not None:
        record_index(output_dir, out, index)
    return out


def record_index(output_dir: str | Path, shards: ShardIndex, index: str = "shards") -> None:
    """Merge ``shards`` into ``<output_dir>/index/<index>.json`` (other teachers' shards stay)."""
    try:
        old = ShardIndex.from_dict(read_index(output_dir, index, "embed"))
    except (ArtifactIndexError, KeyError, TypeError):
        old = ShardIndex()
    write_index(output_dir, index, old.merged(shards).to_dict())


@dataclass
class _ShardJob:
    """One shard being written by its workers: sample ranges (one per worker), the temp folder they
    write into, and the finished ranges' descriptors (range index -> what :func:`write_range` yields)."""

    teacher: str
    split: str
    key: ShardKey
    rows: int
    ranges: list[tuple[int, int]]
    tmp: Path
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    published: bool = False


class _EmbedTasks:
    """W :func:`embed_ranges` tasks per teacher with work (worker j: range j of each of its shards),
    a progress bar per teacher fed by all of them, and each shard published by the driver once all
    its ranges are written; on any failure (or Ctrl-C) the unfinished tasks are cancelled and the
    unpublished shards' temp folders removed."""

    STOP_WAIT_S = 30.0  # after a cancel, how long to wait for the tasks to end before removing their folders

    def __init__(self, teachers: TeacherSet, data: DataConfig, ecfg: EmbedConfig, output_dir: Path,
                 amp: bool, progress: bool, bar_position: int = 0) -> None:
        self.teachers, self.data, self.ecfg = teachers, data, ecfg
        self.output_dir, self.root = output_dir, layout.shards(output_dir)
        self.amp, self.progress, self.bar_position = amp, progress, bar_position

    def run(self, todo: dict[str, list[tuple[str, ShardKey, int]]]) -> list[tuple[ShardRecord, int]]:
        """Write the shards of ``todo`` (teacher -> [(split, key, samples)]); (record, workers) per shard."""
        task = embed_task(self.ecfg, embed_ranges)
        data, ecfg = to_dict(self.data), to_dict(self.ecfg)
        rps, per_batch = rows_per_sample(self.ecfg), samples_per_batch(self.ecfg)
        workers = plan_workers(self.ecfg, {name: sum(n for _, _, n in jobs) * rps for name, jobs in todo.items()},
                               ray.available_resources())
        shards: dict[str, _ShardJob] = {}  # dirname -> job
        gens: dict[Any, str] = {}  # generator -> teacher
        bars: dict[str, Any] = {}
        try:
            for i, (name, jobs) in enumerate(todo.items()):
                mine = []
                for split, key, n in jobs:
                    ranges = row_ranges(n, rps, per_batch, self.ecfg.rows_per_part, workers[name])
                    mine.append(_ShardJob(name, split, key, n * rps, ranges, new_temp_dir(self.root, key)))
                    shards[key.dirname] = mine[-1]
                bars[name] = tqdm(total=sum(j.rows for j in mine), desc=f"embed {name}", unit="row",
                                  position=self.bar_position + i, disable=not self.progress, leave=True)
                for w in range(max(len(j.ranges) for j in mine)):  # worker w: range w of each shard that has one
                    ranges = [{"split": j.split, "key": j.key.to_dict(), "start": j.ranges[w][0], "stop": j.ranges[w][1],
                               "index": w, "tmp": str(j.tmp)} for j in mine if w < len(j.ranges)]
                    gens[task.remote(asdict(self.teachers[name]), data, ecfg, str(self.output_dir),
                                     self.amp, ranges)] = name
            return self._drain(gens, shards, bars)
        finally:
            for b in bars.values():
                b.close()
            self._stop(gens)
            for j in shards.values():
                if not j.published:
                    shutil.rmtree(j.tmp, ignore_errors=True)

    def _stop(self, gens: dict[Any, str]) -> None:
        """Cancel what is left after an error or Ctrl-C (its CPUs/GPU go back) and wait, a bounded
        time, until those tasks have ended, so that none still writes into a folder being removed."""
        for g in gens:
            with contextlib.suppress(Exception):
                ray.cancel(g, force=True)
        if gens:
            with contextlib.suppress(Exception):
                ray.wait([g.completed() for g in gens], num_returns=len(gens), timeout=self.STOP_WAIT_S)

    def _drain(self, gens: dict[Any, str], shards: dict[str, _ShardJob], bars: dict[str, Any]) -> list[tuple[ShardRecord, int]]:
        """Follow every task until it ends: progress after each batch, each shard published when
        its last range is written. The only serial work here is a few renames per shard."""
        results = []
        started = dict.fromkeys(bars, time.perf_counter())  # the current shard's start, per teacher
        while gens:
            ready, _ = ray.wait(list(gens), num_returns=1)
            g = ready[0]
            name = gens[g]
            try:
                item = ray.get(next(g))
            except ray.exceptions.RayTaskError as e:
                cause = disk_full_cause(e)
                if cause is not None:  # one line naming the file, not the task's traceback
                    raise DiskFullError(cause) from None
                raise
            except StopIteration:
                del gens[g]
                continue
            if not isinstance(item, dict):
                bars[name].update(item)
                continue
            job = shards[item["shard"]]
            job.done[item["range"]] = item
            if len(job.done) < len(job.ranges):
                continue
            parts = [p for w in range(len(job.ranges)) for p in job.done[w]["parts"]]  # row order
            if sum(p["rows"] for p in parts) != job.rows:
                raise ShardCorruptError(f"shard {job.tmp}: its workers wrote {sum(p['rows'] for p in parts)} rows, "
                                        f"the plan has {job.rows}")
            m = publish_shard(job.tmp, self.root / job.key.dirname, job.key, parts=parts, **item["meta"])
            job.published = True
            now = time.perf_counter()
            results.append((ShardRecord(name, job.split, str(self.root / job.key.dirname), job.key.shard_id,
                                        m["num_rows"], False, now - started[name]), len(job.ranges)))
            started[name] = now
        return results
