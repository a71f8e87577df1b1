"""The student's training rows: the student's own modality joined with the teachers' shards.

Row r of the train shards (one sample, one view) is the unit of training and the memory slot
of CRD-style losses. The student's input for row r is the dataset sample with that
``sample_id``, in the student's modality; for an image modality with stored views it is
replayed with the row's view parameters, so the student sees exactly what the teachers saw.
Without teachers (a CE-only baseline) the rows are the dataset's own samples.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ensemble_kd.losses.base import TeacherBank
from ensemble_kd.shards import ShardSet
from ensemble_kd.views import apply_view
from modalities import PairedDataset


class DistillData:
    """Row-indexed access to (student input, label, teacher outputs) for the train split."""

    def __init__(self, ds: PairedDataset, modality: str, shard_dirs: Mapping[str, str | Path] | None = None) -> None:
        self.ds, self.modality = ds, modality
        self.spec = ds.spec(modality)
        if shard_dirs:
            ss = ShardSet.open(list(shard_dirs.values()))
            if set(ss.teachers) != set(shard_dirs):
                raise ValueError(f"shards hold teachers {ss.teachers}, expected {sorted(shard_dirs)}")
            fp = ds.fingerprint()
            got = ss.first.manifest["dataset"]["fingerprint"]
            if got != fp:
                raise ValueError(f"shards {ss.first.dir} were made from another dataset ({got[:16]}) than the student's "
                                 f"{ds.name}/{ds.split} ({fp[:16]})")
            self.bank = TeacherBank(
                embeddings={n: ss.embeddings(n) for n in shard_dirs},
                logits={n: ss.logits(n) for n in shard_dirs},
                labels=ss.labels, sample_ids=ss.sample_ids,
            )
            self.positions = torch.from_numpy(ds.positions_of(ss.sample_ids.numpy()))  # (R,) dataset row of each shard row
            v = ss.views
            self.top, self.left, self.flip = v["top"], v["left"], v["flip"]
            self.pad = int(ss.first.manifest["views"]["crop_padding"])
            self.replay = self.spec.kind == "image" and int(ss.first.manifest["views"]["num_views"]) > 1
        else:
            self.bank = TeacherBank({}, {}, torch.from_numpy(ds.labels), torch.from_numpy(ds.sample_ids))
            self.positions = torch.arange(len(ds))
            self.replay = False
        self.labels = self.bank.labels

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def batch(self, rows: torch.Tensor, device: torch.device) -> dict:
        """Inputs of the given rows: x (B, *shape), labels (B,), index (B,), teacher emb/logits dicts."""
        rows = rows.long()
        b = self.ds.get_batch(self.positions[rows].numpy(), [self.modality])
        x = b["inputs"][self.modality]
        if self.replay:  # the exact view the teachers embedded
            x = apply_view(x, self.top[rows], self.left[rows], self.flip[rows], self.pad)
        return {
            "x": x.to(device, non_blocking=True),
            "labels": self.labels[rows].to(device),
            "index": rows.to(device),
            "teacher_emb": {n: e[rows].float().to(device) for n, e in self.bank.embeddings.items()},
            "teacher_logits": {n: t[rows].float().to(device) for n, t in self.bank.logits.items()},
        }


def epoch_rows(num_rows: int, global_batch: int, world: int, rank: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """This rank's row batches for one epoch: one seeded permutation shared by all ranks, cut into
    global batches (the last partial one dropped, so every rank takes the same number of steps,
    which the memory's collectives need), each split evenly across ranks."""
    if global_batch % world:
        raise ValueError(f"distill.batch_size {global_batch} must be divisible by num_workers {world}")
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_rows, generator=g)
    local = global_batch // world
    steps = num_rows // global_batch
    if steps == 0:
        raise ValueError(f"distill.batch_size {global_batch} is larger than the {num_rows} training rows")
    return [perm[s * global_batch + rank * local : s * global_batch + (rank + 1) * local] for s in range(steps)]
