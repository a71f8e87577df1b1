"""The embed stage: one Ray actor per teacher streams the dataset and writes Arrow shards.

Each :class:`TeacherEmbedder` actor loads one frozen teacher (on a GPU fraction on clusters,
a CPU here), reads the dataset itself (so no sample crosses the object store), runs batched
inference, and writes the shard through :class:`~ensemble_kd.shards.ShardWriter` (temp dir,
then rename). Its ``embed`` method is a Ray streaming generator: it yields the number of rows
done after every batch, which the driver turns into one progress bar per teacher, then the
manifest.

Why plain actors and not Ray Data ``map_batches``: the teachers read their inputs from the
dataset registry inside the actor and write whole files, so there is nothing for Ray Data to
shuffle or stream between stages; a measured bare actor stays at the bare-loop speed per core
(``bench/embed_throughput.py``) where a Ray Data pipeline on a 2-core machine spends its
cores on scheduling. The actors are still Ray's (placement, GPU fractions, retries).

The stage takes its inputs explicitly (a :class:`~ensemble_kd.artifacts.TeacherSet`, a dataset,
the splits and the embed recipe) and returns a :class:`~ensemble_kd.artifacts.ShardIndex`; the
select stage's callers use it the same way for the pool and the teachers' own test split.
"""
from __future__ import annotations

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


class TeacherEmbedder:
    """Ray actor body: one frozen teacher, writes its shards for each requested split."""

    def __init__(self, teacher: dict[str, Any], data: dict[str, Any], device: str, amp: bool, num_threads: int) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.device = resolve_device(device)
        self.data = DataConfig(**data)
        ds = build_dataset(self.data.name, "train", self.data.root, **self.data.kwargs)  # the input spec and classes
        self.teacher = load_record(teacher, ds, self.device)
        self.amp = amp

    def embed(self, split: str, key: dict[str, Any], root: str, ecfg: dict[str, Any]):
        ds = build_dataset(self.data.name, split, self.data.root, **self.data.kwargs)
        k = ShardKey(**key)
        fp = ds.fingerprint()
        if fp != k.dataset_fingerprint:  # e.g. a cluster node whose copy of the data differs
            raise ValueError(f"dataset {ds.name!r} ({split}) on this node has fingerprint {fp[:16]}, the driver's has "
                             f"{k.dataset_fingerprint[:16]}: the nodes do not see the same data")
        ec = EmbedConfig(**ecfg)
        yield from write_shard(self.teacher, ds, k, Path(root), ec, self.device, self.amp)


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
    """Write (or reuse) the shard of every teacher x split; one Ray actor per teacher (Ray must be
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
        written = _EmbedActors(teachers, data, ecfg, root, device, amp, progress, bar_position).run(todo)
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


class _EmbedActors:
    """One :class:`TeacherEmbedder` actor per teacher with work, each streaming its shards one
    after another; a progress bar per teacher; an actor is killed as soon as it is done (freeing
    its CPUs/GPU for teachers still waiting for a slot)."""

    def __init__(self, teachers: TeacherSet, data: DataConfig, ecfg: EmbedConfig, root: Path, device: str,
                 amp: bool, progress: bool, bar_position: int = 0) -> None:
        self.teachers, self.data, self.ecfg, self.root = teachers, data, ecfg, root
        self.device, self.amp, self.progress, self.bar_position = device, amp, progress, bar_position
        self.actors: dict[str, Any] = {}
        self.gens: dict[Any, tuple[str, str, ShardKey]] = {}
        self.started: dict[Any, float] = {}
        self.pending: dict[str, list[tuple[str, ShardKey, int]]] = {}

    def _launch(self, name: str) -> None:
        split, key, _ = self.pending[name].pop(0)
        g = self.actors[name].embed.remote(split, key.to_dict(), str(self.root), to_dict(self.ecfg))
        self.gens[g] = (name, split, key)
        self.started[g] = time.perf_counter()

    def run(self, todo: dict[str, list[tuple[str, ShardKey, int]]]) -> list[ShardRecord]:
        actor_cls = ray.remote(TeacherEmbedder)
        threads = max(1, int(self.ecfg.cpus_per_actor))
        bars = {}
        for i, (name, jobs) in enumerate(todo.items()):
            self.actors[name] = actor_cls.options(num_cpus=self.ecfg.cpus_per_actor,
                                                  num_gpus=self.ecfg.gpus_per_actor).remote(
                asdict(self.teachers[name]), to_dict(self.data), self.device, self.amp, threads)
            bars[name] = tqdm(total=sum(rows for _, _, rows in jobs), desc=f"embed {name}", unit="row", position=self.bar_position + i,
                              disable=not self.progress, leave=True)
        self.pending = {name: list(jobs) for name, jobs in todo.items()}
        for name in todo:
            self._launch(name)
        try:
            return self._drain(bars)
        finally:
            for b in bars.values():
                b.close()
            for a in self.actors.values():
                ray.kill(a)

    def _drain(self, bars: dict[str, Any]) -> list[ShardRecord]:
        results = []
        while self.gens:
            ready, _ = ray.wait(list(self.gens), num_returns=1)
            g = ready[0]
            name, split, key = self.gens[g]
            try:
                item = ray.get(next(g))
            except ray.exceptions.RayTaskError as e:
                cause = disk_full_cause(e)
                if cause is not None:  # one line naming the file, not the actor's traceback
                    raise DiskFullError(cause) from None
                raise
            except StopIteration:
                del self.gens[g]
                if self.pending[name]:
                    self._launch(name)
                else:  # free its CPUs/GPU now: teachers beyond the cluster's slots are waiting for them
                    ray.kill(self.actors.pop(name))
                continue
            if isinstance(item, dict):  # the manifest: this shard is published
                results.append(ShardRecord(name, split, str(self.root / key.dirname), key.shard_id, item["num_rows"],
                                           False, time.perf_counter() - self.started[g]))
            else:
                bars[name].update(item)
        return results
