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
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble_kd.adversarial import pgd_perturb, row_generators
from ensemble_kd.config import AdversarialConfig, DataConfig, EmbedConfig, ExperimentConfig, ViewsConfig, to_dict
from ensemble_kd.devices import autocast, resolve_device
from ensemble_kd.shards import Shard, ShardKey, ShardWriter, check_manifest
from ensemble_kd.teachers import Teacher, load_teacher, read_checkpoint
from ensemble_kd.views import apply_view, draw_views
from modalities import PairedDataset, build_dataset


@dataclass
class ShardResult:
    teacher: str
    split: str
    dir: Path
    shard_id: str
    rows: int
    reused: bool
    seconds: float


def view_recipe(views: ViewsConfig, adversarial: AdversarialConfig | None = None) -> dict[str, Any]:
    """The view recipe stored in a shard and hashed into its id. It is the same for every teacher
    of a run: vector modalities are not augmented, their V rows per sample are identity views,
    which keeps them row-aligned with the image teachers of the same ensemble. Enabled
    adversarial views add an ``adversarial`` entry (so they change the shard id); disabled ones
    add nothing, so shards made before adversarial views existed keep their ids."""
    recipe = to_dict(views)
    if adversarial is not None and adversarial.enabled:
        recipe["adversarial"] = to_dict(adversarial)
    return recipe


def num_adv_views(recipe: dict[str, Any]) -> int:
    """Adversarial views per sample in a shard of this (stored) view recipe; 0 for none."""
    adv = recipe.get("adversarial") or {}
    return int(adv.get("num_views", 0)) if adv.get("enabled") else 0


def shard_key(teacher: str, checkpoint_sha256: str, ds: PairedDataset, fingerprint: str, recipe: dict[str, Any],
              embedding_dtype: str) -> ShardKey:
    return ShardKey(teacher, checkpoint_sha256, ds.name, ds.split, fingerprint, recipe, embedding_dtype)


@torch.no_grad()
def embed_rows(teacher: Teacher, ds: PairedDataset, positions: np.ndarray, views: ViewsConfig, device: torch.device,
               amp: bool, adversarial: AdversarialConfig | None = None) -> dict[str, np.ndarray]:
    """Teacher outputs for every view of the samples at ``positions``: one shard batch (sample-major).

    With ``adversarial`` enabled each sample gets A more rows after its V normal views: view
    V + a is PGD (against this teacher, on the true label) applied to normal view a % V, with that
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
                        adv.step_size, gens, adv.random_start).float().cpu()  # (B*A, ...)
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

    def __init__(self, checkpoint: str, name: str, data: dict[str, Any], device: str, amp: bool, num_threads: int) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.device = resolve_device(device)
        self.teacher = load_teacher(checkpoint, self.device, name=name)
        self.data = DataConfig(**data)
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


def plan_shards(cfg: ExperimentConfig, checkpoints: dict[str, Path]) -> list[tuple[str, str, ShardKey, int]]:
    """(teacher, split, key, number of samples) for every shard the config asks for."""
    plan = []
    for split in cfg.embed.splits:
        ds = build_dataset(cfg.data.name, split, cfg.data.root, **cfg.data.kwargs)
        fp = ds.fingerprint()
        for t in cfg.teachers:
            ck = read_checkpoint(checkpoints[t.name])
            if ck["modality"] not in ds.modalities:
                raise ValueError(f"teacher {t.name!r} reads modality {ck['modality']!r}, which dataset {ds.name!r} does not have")
            recipe = view_recipe(cfg.embed.views, cfg.embed.adversarial)
            plan.append((t.name, split, shard_key(t.name, ck["content_hash"], ds, fp, recipe, cfg.embed.embedding_dtype), len(ds)))
    return plan


def run_embed(cfg: ExperimentConfig, checkpoints: dict[str, Path], progress: bool = True, log=print) -> list[ShardResult]:
    """Write (or reuse) every shard of ``cfg``; one Ray actor per teacher. Needs Ray initialised."""
    import ray
    from tqdm.auto import tqdm

    root = cfg.shard_dir
    root.mkdir(parents=True, exist_ok=True)
    results: list[ShardResult] = []
    todo: dict[str, list[tuple[str, ShardKey, int]]] = {}
    for name, split, key, num_samples in plan_shards(cfg, checkpoints):
        d = root / key.dirname
        if d.exists():
            m = check_manifest(d, key)  # refuses a tampered/mismatched manifest, naming both sides
            Shard(d)  # cheap integrity check (sizes, schema, rows): a truncated shard is reported, not reused
            log(f"shard {d.name}: reused ({m['num_rows']} rows)")
            results.append(ShardResult(name, split, d, key.shard_id, m["num_rows"], True, 0.0))
        else:
            todo.setdefault(name, []).append((split, key, num_samples * (cfg.embed.views.num_views + num_adv_views(key.views))))
    if not todo:
        return results

    actor_cls = ray.remote(TeacherEmbedder)
    threads = max(1, int(cfg.embed.num_cpus_per_actor))
    actors, gens, bars, started = {}, {}, {}, {}
    for i, (name, jobs) in enumerate(todo.items()):
        actors[name] = actor_cls.options(
            num_cpus=cfg.embed.num_cpus_per_actor, num_gpus=cfg.embed.num_gpus_per_actor, name=None
        ).remote(str(checkpoints[name]), name, to_dict(cfg.data), cfg.device, cfg.amp, threads)
        total = sum(rows for _, _, rows in jobs)
        bars[name] = tqdm(total=total, desc=f"embed {name}", unit="row", position=i, disable=not progress, leave=True)
    pending = {name: list(jobs) for name, jobs in todo.items()}

    def launch(name: str) -> None:
        split, key, _ = pending[name].pop(0)
        g = actors[name].embed.remote(split, key.to_dict(), str(root), to_dict(cfg.embed))
        gens[g] = (name, split, key)
        started[g] = time.perf_counter()

    for name in todo:
        launch(name)
    try:
        while gens:
            ready, _ = ray.wait(list(gens), num_returns=1)
            g = ready[0]
            name, split, key = gens[g]
            try:
                item = ray.get(next(g))
            except StopIteration:
                del gens[g]
                if pending[name]:
                    launch(name)
                else:  # free its CPUs/GPU now: teachers beyond the cluster's slots are waiting for them
                    ray.kill(actors.pop(name))
                continue
            if isinstance(item, dict):  # the manifest: this shard is published
                d = root / key.dirname
                results.append(ShardResult(name, split, d, key.shard_id, item["num_rows"], False, time.perf_counter() - started[g]))
            else:
                bars[name].update(item)
    finally:
        for b in bars.values():
            b.close()
        for a in actors.values():
            ray.kill(a)
    for r in results:
        if not r.reused:
            log(f"shard {r.dir.name}: wrote {r.rows} rows in {r.seconds:.1f}s")
    return results
