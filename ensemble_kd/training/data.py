"""The student's training rows: the student's own modality joined with the teachers' shards.

Row r of the train shards (one sample, one view) is the unit of training and the memory slot
of CRD-style losses. The student's input for row r is the dataset sample with that
``sample_id``, in the student's modality; for an image modality with stored views it is
replayed with the row's view parameters, so the student sees exactly what the teachers saw.
Adversarial rows (GACD's PGD views, made at embed time) also get the stored perturbation of the
teacher that reads the student's modality added, bit for bit the input that teacher embedded
(see :meth:`DistillData._adv_replay`).
Without teachers (a CE-only baseline) the rows are the dataset's own samples.
With ``distill.labels`` only the drawn samples' rows keep their ground truth (``labelled``); the
others carry the teachers' ensemble prediction (see :mod:`ensemble_kd.blocks.labels`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ensemble_kd.blocks.bank import TeacherBank
from ensemble_kd.core.config import ExperimentConfig, LabelsConfig
from ensemble_kd.blocks.labels import labelled_rows, row_labels
from ensemble_kd.blocks.selection import Selection, check_selection, load_selection, restrict_bank
from ensemble_kd.storage.shards import ShardSet
from ensemble_kd.blocks.views import apply_view, num_adv_views
from ensemble_kd.storage.datastore import open_split
from ensemble_kd.core.rows import as_torch
from modalities import PairedDataset


class DistillData:
    """Row-indexed access to (student input, label, teacher outputs) for the train split."""

    def __init__(self, ds: PairedDataset, modality: str, shard_dirs: Mapping[str, str | Path] | None = None,
                 adv_replay_teacher: str | None = None, selection: str | Path | None = None,
                 labels: LabelsConfig | None = None, seed: int = 0) -> None:
        self.ds, self.modality = ds, modality
        self.spec = ds.spec(modality)
        self.adv_delta: torch.Tensor | None = None  # (R, numel) PGD perturbations replayed on adversarial rows
        self.selection: Selection | None = None
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
            self._adv_replay(ss, adv_replay_teacher)
        else:
            self.bank = TeacherBank({}, {}, as_torch(ds.labels), as_torch(ds.sample_ids))
            self.positions = torch.arange(len(ds))
            self.replay = False
        if selection is not None:
            self._restrict_to_selection(selection, ss if shard_dirs else None)
        self.labelled: torch.Tensor | None = None  # (R,) bool: row keeps its ground truth; None = every row
        if labels is not None and labels.subset:
            self._label_subset(labels, seed)
        self.labels = self.bank.labels

    def _label_subset(self, labels: LabelsConfig, seed: int) -> None:
        """``distill.labels``: keep the ground truth on the drawn samples' rows only; the other rows
        are labelled (in the bank too, so class-aware negatives use it) with the teachers' ensemble
        prediction on that row (:func:`ensemble_kd.blocks.labels.row_labels`)."""
        if self.selection is not None:
            raise ValueError("distill.labels: a label subset does not apply to a DFND selection (distill.selection)")
        self.labelled = labelled_rows(self.bank.sample_ids, self.ds.sample_ids, self.ds.labels, labels, seed)  # (R,)
        b = self.bank
        self.bank = TeacherBank(b.embeddings, b.logits, row_labels(b.labels, self.labelled, b.logits), b.sample_ids)

    def _restrict_to_selection(self, path: str | Path, ss: ShardSet | None) -> None:
        """DFND (``distill.selection``): keep only the selected shard rows, labelled with the
        teachers' pseudo-labels. Training row r is the r-th selected shard row
        (``self.shard_rows[r]``) everywhere: the bank (so CRD memories, negatives and Pn = 1/M
        cover exactly the rows that train, class-aware on the pseudo-labels), the labels every
        loss sees, the dataset positions and the stored view/PGD parameters; ``index`` is r."""
        if ss is None:
            raise ValueError(f"distill.selection {path}: training on a selection needs the teachers' train shards")
        sel = load_selection(path)
        check_selection(sel, {n: s.manifest for n, s in ss.shards.items()}, ss.sample_ids)
        keep = sel.rows  # (K,) shard rows, ascending
        self.bank = restrict_bank(self.bank, sel)  # labels = pseudo-labels
        self.selection = sel
        self.positions, self.shard_rows = self.positions[keep], keep
        self.top, self.left, self.flip = self.top[keep], self.left[keep], self.flip[keep]
        if self.adv_delta is not None:
            self.adv_delta, self.adv_rows = self.adv_delta[keep], self.adv_rows[keep]

    def _adv_replay(self, ss: ShardSet, teacher: str | None) -> None:
        """Pick the teacher whose PGD deltas the student replays (``teacher``, or the one distill
        teacher of the student's modality); refuse when the shards hold adversarial rows and
        none, or more than one, fits. Shards without adversarial views ignore ``teacher``."""
        recipe = ss.first.manifest["views"]
        if not num_adv_views(recipe):
            return
        mods = {n: s.manifest["teacher"].get("modality") for n, s in ss.shards.items()}
        if teacher is None:
            same = [n for n, m in mods.items() if m == self.modality]
            if len(same) != 1:
                raise ValueError(
                    f"the shards hold adversarial views, which the student can only see through a teacher of its "
                    f"modality {self.modality!r}; teachers' modalities: {mods}. "
                    + ("Set distill.adv_replay_teacher to one of " + str(same) if same else
                       "Use a student of a teacher's modality, or embed without embed.adversarial"))
            teacher = same[0]
        elif teacher not in mods:
            raise ValueError(f"distill.adv_replay_teacher: {teacher!r} is not a distill teacher; teachers: {sorted(mods)}")
        elif mods[teacher] != self.modality:
            raise ValueError(f"distill.adv_replay_teacher: teacher {teacher!r} reads modality {mods[teacher]!r}, "
                             f"the student reads {self.modality!r}: its deltas do not apply")
        delta = ss.adv_delta(teacher)  # (R, numel)
        if delta is None or delta.shape[1] != self.spec.numel:
            raise ValueError(f"shard {ss.shards[teacher].dir}: adversarial deltas of shape "
                             f"{None if delta is None else tuple(delta.shape)}, expected (R, {self.spec.numel})")
        self.adv_delta = delta
        self.adv_rows = ss.views["view"] >= int(recipe["num_views"])  # (R,) views V.. are the adversarial ones

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def teacher_dims(self) -> dict[str, int]:
        return {n: int(e.shape[1]) for n, e in self.bank.embeddings.items()}

    def batch(self, rows: torch.Tensor, device: torch.device, epoch: int = 0, step: int = 0) -> dict:
        """Inputs of the given rows: x (B, *shape), labels (B,), index (B,), teacher emb/logits dicts,
        and with a label subset ``labelled`` (B,) bool. The views are the stored ones, the same
        every epoch (``epoch``/``step`` are not needed)."""
        rows = rows.long()
        b = self.ds.get_batch(self.positions[rows].numpy(), [self.modality])
        x = b["inputs"][self.modality]
        if self.replay:  # the exact view the teachers embedded
            x = apply_view(x, self.top[rows], self.left[rows], self.flip[rows], self.pad)
        if self.adv_delta is not None:  # adversarial rows: + the stored delta, the very op the teacher ran
            adv = self.adv_rows[rows].reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
            x = torch.where(adv, x + self.adv_delta[rows].reshape(x.shape), x)  # normal rows untouched
        return {
            "x": x.to(device, non_blocking=True),
            "labels": self.labels[rows].to(device),
            "index": rows.to(device),
            "teacher_emb": {n: e[rows].float().to(device) for n, e in self.bank.embeddings.items()},
            "teacher_logits": {n: t[rows].float().to(device) for n, t in self.bank.logits.items()},
            "teacher_feats": {},
            **({"labelled": self.labelled[rows].to(device)} if self.labelled is not None else {}),
        }


def eval_dataset(cfg: ExperimentConfig, train_ds: PairedDataset | None = None) -> PairedDataset:
    """The dataset whose test split measures the student: ``distill.eval_data`` (DFND: the
    teachers' own test set) or ``data``. With ``train_ds``, the student's modality must have the
    same input shape and the class count must agree (else the error names distill.eval_data)."""
    e = cfg.distill.eval_data or cfg.data
    ds = open_split(e, "test", cfg.output_dir)
    if train_ds is not None and cfg.distill.eval_data is not None:
        m = cfg.distill.student.modality
        a, b = train_ds.spec(m), ds.spec(m)
        if tuple(a.shape) != tuple(b.shape) or train_ds.num_classes != ds.num_classes:
            raise ValueError(f"distill.eval_data: {e.name!r} gives the student's modality {m!r} shape {tuple(b.shape)} "
                             f"and {ds.num_classes} classes; the training data {cfg.data.name!r} gives {tuple(a.shape)} "
                             f"and {train_ds.num_classes} (set its kwargs, e.g. image_size)")
    return ds


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
