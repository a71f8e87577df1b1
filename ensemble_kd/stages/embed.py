"""The embed stage: one Ray task per teacher streams the dataset and writes Arrow shards.

Each teacher's task (:func:`embed_teacher`) loads the frozen teacher once (on a GPU fraction on
clusters, a CPU here), reads the dataset itself (so no sample crosses the object store), runs
batched inference, and writes the shard of each requested split through
:class:`~ensemble_kd.shards.ShardWriter` (temp dir, then rename), one split after another. The
task is a Ray streaming generator: it yields the number of rows done after every batch, which
the driver turns into one progress bar per teacher, then each shard's manifest.

Why a task and not an actor: Ray starts a new Python process for every actor, and on a small
machine its imports (torch, Ray, this package) cost about 4 s of a core per teacher, more than
embedding a small dataset does. A task runs in one of Ray's pooled worker processes, usually
the one that has just trained the teacher, with everything imported already (measured: the
suite's 27 embed actors used 108 core-seconds). The task still holds one teacher for all its
splits, reserves its CPUs/GPU fraction while it runs (``embed.cpus_per_actor``,
``embed.gpus_per_actor``, named when this was an actor), and frees them when it ends. A task
with a GPU runs in a fresh process each time (``max_calls=1``): CUDA's device list is fixed when a
process first uses it, and a pooled process could be handed another GPU next time.

Why not Ray Data ``map_batches``: the teachers read their inputs from the dataset registry
inside the task and write whole files, so there is nothing for Ray Data to shuffle or stream
between stages; a measured bare task stays at the bare-loop speed per core
(``bench/embed_throughput.py``) where a Ray Data pipeline on a 2-core machine spends its cores
on scheduling.

The stage takes its inputs explicitly (a :class:`~ensemble_kd.artifacts.TeacherSet`, a dataset,
the splits and the embed recipe) and returns a :class:`~ensemble_kd.artifacts.ShardIndex`; the
select stage's callers use it the same way for the pool and the teachers' own test split.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from ensemble_kd.adversarial import pgd_perturb, row_generators
from ensemble_kd.artifacts import ArtifactIndexError, ShardIndex, ShardRecord, TeacherSet, read_index, write_index
from ensemble_kd.checkpoint import DiskFullError, disk_full_cause
from ensemble_kd.config import AdversarialConfig, DataConfig, EmbedConfig, ViewsConfig, to_dict
from ensemble_kd.devices import autocast, resolve_device
from ensemble_kd.shards import Shard, ShardCorruptError, ShardKey, ShardWriter, check_manifest, discard_shard
from ensemble_kd.teacher_checkpoint import Teacher, load_record
from ensemble_kd.views import apply_view, draw_views, num_adv_views, view_recipe
from modalities import PairedDataset, build_dataset


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


def write_shard(teacher: Teacher, ds: PairedDataset, key: ShardKey, root: Path, ecfg: EmbedConfig, device: torch.device,
                amp: bool):
    """Generator: writes one shard, yields rows done after each batch, then the manifest."""
    A = ecfg.adversarial.num_views if ecfg.adversarial.enabled else 0
    V = ecfg.views.num_views + A
    per_batch = max(1, ecfg.batch_size // V)
    extra = {"arch": teacher.arch, "modality": teacher.modality, "checkpoint_sha256": teacher.content_hash,
             "test_top1": teacher.test_top1}
    adv_dim = ds.spec(teacher.modality).numel if A else 0
    with ShardWriter(root, key, teacher.embed_dim, teacher.num_classes, ecfg.rows_per_part, extra, adv_dim=adv_dim) as w:
        for start in range(0, len(ds), per_batch):
            rows = embed_rows(teacher, ds, np.arange(start, min(start + per_batch, len(ds))), ecfg.views, device, amp,
                              ecfg.adversarial)
            w.write(**rows)
            yield len(rows["sample_id"])
        yield w.close(num_samples=len(ds), dataset_name=ds.name)


def embed_teacher(teacher: dict[str, Any], data: dict[str, Any], ecfg: dict[str, Any], root: str, device: str,
                  amp: bool, jobs: Sequence[tuple[str, dict[str, Any]]]):
    """Ray task body (a streaming generator): load one frozen teacher (a TeacherRecord as a dict)
    once, then write its shard under ``root`` for each job ``(split, shard key)`` in order; yields
    the rows done after every batch and each shard's manifest when it is published."""
    ec = EmbedConfig(**ecfg)
    torch.set_num_threads(max(1, int(ec.cpus_per_actor)))  # a pooled worker keeps the last task's setting otherwise
    dev = resolve_device(device)
    dc = DataConfig(**data)
    t = load_record(teacher, build_dataset(dc.name, "train", dc.root, **dc.kwargs), dev)  # the spec and classes
    for split, key in jobs:
        ds = build_dataset(dc.name, split, dc.root, **dc.kwargs)
        k = ShardKey(**key)
        fp = ds.fingerprint()
        if fp != k.dataset_fingerprint:  # e.g. a cluster node whose copy of the data differs
            raise ValueError(f"dataset {ds.name!r} ({split}) on this node has fingerprint {fp[:16]}, the driver's has "
                             f"{k.dataset_fingerprint[:16]}: the nodes do not see the same data")
        yield from write_shard(t, ds, k, Path(root), ec, dev, amp)


def embed_task(ecfg: EmbedConfig) -> Any:
    """:func:`embed_teacher` as a Ray remote function with the embed config's resources. No retry:
    a failed teacher is reported, not run again. With a GPU, a fresh worker process per task: set
    here because Ray's own default (max_calls=1 for GPU tasks) only follows a ``num_gpus`` given to
    ``ray.remote``, not to ``.options``."""
    return ray.remote(max_calls=1 if ecfg.gpus_per_actor > 0 else 0)(embed_teacher).options(
        num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor, max_retries=0)


def plan_shards(teachers: TeacherSet, data: DataConfig, splits: Sequence[str], ecfg: EmbedConfig
                ) -> list[tuple[str, str, ShardKey, int]]:
    """(teacher, split, key, number of samples) of every shard: each teacher x each split."""
    plan = []
    recipe = view_recipe(ecfg.views, ecfg.adversarial)
    for split in splits:
        ds = build_dataset(data.name, split, data.root, **data.kwargs)
        fp = ds.fingerprint()
        for name, t in teachers.items():
            if t.modality not in ds.modalities:
                raise ValueError(f"teacher {name!r} reads modality {t.modality!r}, which dataset {ds.name!r} does not have")
            plan.append((name, split, shard_key(name, t.content_hash, ds, fp, recipe, ecfg.embedding_dtype), len(ds)))
    return plan


def run(teachers: TeacherSet, data: DataConfig, splits: Sequence[str], ecfg: EmbedConfig, output_dir: str | Path,
        device: str = "auto", amp: bool = True, progress: bool = True, log: Callable[[str], None] = print,
        index: str | None = "shards", bar_position: int = 0) -> ShardIndex:
    """Write (or reuse) the shard of every teacher x split; one Ray task per teacher (Ray must be
    initialised). Records the result in ``<output_dir>/index/<index>.json`` (merged with what is
    there: other teachers' shards stay), unless ``index`` is None. ``bar_position``: the first
    progress bar's line (runs side by side keep their bars apart)."""
    root = Path(output_dir) / "shards"
    root.mkdir(parents=True, exist_ok=True)
    results: list[ShardRecord] = []
    todo: dict[str, list[tuple[str, ShardKey, int]]] = {}
    for name, split, key, num_samples in plan_shards(teachers, data, splits, ecfg):
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
        todo.setdefault(name, []).append((split, key, num_samples * (ecfg.views.num_views + num_adv_views(key.views))))
    if todo:
        written = _EmbedTasks(teachers, data, ecfg, root, device, amp, progress, bar_position).run(todo)
        for r in written:
            log(f"shard {Path(r.dir).name}: wrote {r.rows} rows in {r.seconds:.1f}s")
        results += written
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


class _EmbedTasks:
    """One :func:`embed_teacher` task per teacher with work, each streaming its shards one after
    another, and a progress bar per teacher; the unfinished tasks are cancelled if the stage fails."""

    def __init__(self, teachers: TeacherSet, data: DataConfig, ecfg: EmbedConfig, root: Path, device: str,
                 amp: bool, progress: bool, bar_position: int = 0) -> None:
        self.teachers, self.data, self.ecfg, self.root = teachers, data, ecfg, root
        self.device, self.amp, self.progress, self.bar_position = device, amp, progress, bar_position

    def run(self, todo: dict[str, list[tuple[str, ShardKey, int]]]) -> list[ShardRecord]:
        task = embed_task(self.ecfg)
        data, ecfg = to_dict(self.data), to_dict(self.ecfg)
        gens: dict[Any, str] = {}  # generator -> teacher
        bars = {}
        for i, (name, jobs) in enumerate(todo.items()):
            g = task.remote(asdict(self.teachers[name]), data, ecfg, str(self.root), self.device, self.amp,
                            [(split, key.to_dict()) for split, key, _ in jobs])
            gens[g] = name
            bars[name] = tqdm(total=sum(rows for _, _, rows in jobs), desc=f"embed {name}", unit="row",
                              position=self.bar_position + i, disable=not self.progress, leave=True)
        try:
            return self._drain(gens, {name: list(jobs) for name, jobs in todo.items()}, bars)
        finally:
            for b in bars.values():
                b.close()
            for g in gens:  # what is left after an error or Ctrl-C: stop it, its CPUs/GPU go back
                with contextlib.suppress(Exception):
                    ray.cancel(g, force=True)

    def _drain(self, gens: dict[Any, str], pending: dict[str, list[tuple[str, ShardKey, int]]],
               bars: dict[str, Any]) -> list[ShardRecord]:
        results = []
        started = {name: time.perf_counter() for name in pending}  # the current shard's start, per teacher
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
            if isinstance(item, dict):  # a manifest: the teacher's next shard in order is published
                split, key, _ = pending[name].pop(0)
                now = time.perf_counter()
                results.append(ShardRecord(name, split, str(self.root / key.dirname), key.shard_id, item["num_rows"],
                                           False, now - started[name]))
                started[name] = now
            else:
                bars[name].update(item)
        return results
