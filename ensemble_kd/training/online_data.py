"""The online data source: the frozen teachers live in the worker and see a fresh view every step.

Row r of an epoch is dataset sample r. Every step draws a new random crop (with zero padding) and
horizontal flip per sample, as the reference CIFAR pipeline does, applies the same view to every
image modality of the sample (the student and the teachers see the same crop when they read
images of one size), and runs the teachers on exactly that batch: their logits, embeddings and,
when a loss asks for them, their intermediate feature maps. Vector modalities are not augmented.

The teachers are frozen (eval mode, no gradients), live here, outside the trainable
``DistillModule``, so they never enter the optimiser, DDP or the training checkpoint. The views
depend only on (seed, epoch, step, sample_id): every rank draws the same view for a sample, and a
resumed run draws the views it would have drawn.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ensemble_kd.blocks.bank import TeacherBank
from ensemble_kd.core.config import AugmentConfig, LabelsConfig
from ensemble_kd.core.devices import autocast
from ensemble_kd.blocks.labels import labelled_rows, row_labels
from ensemble_kd.blocks.memory import stable_seed
from ensemble_kd.core.rows import as_torch
from ensemble_kd.storage.teacher_checkpoint import Teacher
from ensemble_kd.blocks.views import apply_view, draw_views
from modalities import PairedDataset


class OnlineData:
    """Row-indexed access to (fresh view, label, teacher outputs on that view) for the train split."""

    def __init__(self, ds: PairedDataset, modality: str, teachers: Mapping[str, Teacher], augment: AugmentConfig,
                 seed: int = 0, amp: bool = False, feature_maps: bool = False, labels: LabelsConfig | None = None) -> None:
        self.ds, self.modality = ds, modality
        self.spec = ds.spec(modality)
        self.teachers = dict(teachers)
        for name, t in self.teachers.items():
            if t.modality not in ds.modalities:
                raise ValueError(f"teacher {name!r} reads modality {t.modality!r}, which dataset {ds.name!r} does not have")
            if any(p.requires_grad for p in t.model.parameters()) or t.model.training:
                raise ValueError(f"teacher {name!r} is not frozen (eval mode, no gradients)")
        self.augment, self.seed, self.amp, self.feature_maps = augment, int(seed), amp, feature_maps
        self.bank = TeacherBank({}, {}, as_torch(ds.labels), as_torch(ds.sample_ids))
        self.selection = None  # DFND selections are rows of shards: the shard path only
        self.labelled: torch.Tensor | None = None  # (N,) bool: row keeps its ground truth; None = every row
        if labels is not None and labels.subset:
            self.labelled = labelled_rows(ds.sample_ids, ds.sample_ids, ds.labels, labels, self.seed)  # (N,)
            b = self.bank  # the others: the teachers' ensemble prediction on the clean sample (fixed, like a label)
            self.bank = TeacherBank({}, {}, row_labels(b.labels, self.labelled, self._clean_logits()), b.sample_ids)

    @property
    def teacher_dims(self) -> dict[str, int]:
        return {n: t.embed_dim for n, t in self.teachers.items()}

    def __len__(self) -> int:
        return len(self.ds)

    def _views(self, rows: torch.Tensor, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """The batch's inputs in every modality it needs, each image modality under the step's view."""
        mods = list(dict.fromkeys([self.modality, *(t.modality for t in self.teachers.values())]))
        b = self.ds.get_batch(rows.numpy(), mods)
        x = dict(b["inputs"])
        a = self.augment
        if a.enabled:
            # one draw per (seed, epoch, step, sample): fresh every step, identical on every rank
            vp = draw_views(b["sample_id"].numpy(), 1, a.crop_padding, a.flip, False,
                            stable_seed(self.seed, "online-view", epoch, step) & 0xFFFFFFFF)
            top, left, flip = torch.from_numpy(vp.top), torch.from_numpy(vp.left), torch.from_numpy(vp.flip)
            for m in mods:
                if self.ds.spec(m).kind == "image":
                    x[m] = apply_view(x[m], top, left, flip, a.crop_padding)  # (B, C, H, W)
        return {"labels": b["label"], **{f"in:{m}": v for m, v in x.items()}}

    @torch.no_grad()
    def _clean_logits(self, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Every teacher's logits (N, C) on the un-augmented train samples, on the CPU: one pass when
        the source starts, only with a label subset (the unlabelled rows' pseudo-labels)."""
        out: dict[str, list[torch.Tensor]] = {n: [] for n in self.teachers}
        for s in range(0, len(self.ds), batch_size):
            b = self.ds.get_batch(list(range(s, min(s + batch_size, len(self.ds)))), [t.modality for t in self.teachers.values()])
            for name, t in self.teachers.items():
                dev = next(t.model.parameters()).device
                with autocast(dev, self.amp):
                    _, lg = t.model(b["inputs"][t.modality].to(dev))  # (b, C)
                out[name].append(lg.float().cpu())
        return {n: torch.cat(v) for n, v in out.items()}

    @torch.no_grad()
    def _teacher_outputs(self, x: dict[str, torch.Tensor], device: torch.device) -> dict[str, dict]:
        emb, logits, feats = {}, {}, {}
        for name, t in self.teachers.items():
            xt = x[f"in:{t.modality}"].to(device, non_blocking=True)
            with autocast(device, self.amp):
                if self.feature_maps:
                    f, lg = t.model.forward_features(xt)  # [stage maps ..., (B, d_t)], (B, C)
                    feats[name], e = [m.float() for m in f], f[-1]
                else:
                    e, lg = t.model(xt)  # (B, d_t), (B, C)
            emb[name], logits[name] = e.float(), lg.float()
        return {"teacher_emb": emb, "teacher_logits": logits, "teacher_feats": feats}

    def batch(self, rows: torch.Tensor, device: torch.device, epoch: int = 0, step: int = 0) -> dict:
        """Inputs of the given rows under this step's views: x (B, *shape), labels (B,), index (B,),
        teacher emb/logits (and feature maps) dicts computed on that very batch, and with a label
        subset ``labelled`` (B,) bool (``labels`` then come from the bank: ground truth or pseudo)."""
        rows = rows.long()
        x = self._views(rows, epoch, step)
        extra = {} if self.labelled is None else {"labels": self.bank.labels[rows].to(device),
                                                  "labelled": self.labelled[rows].to(device)}
        return {
            "x": x[f"in:{self.modality}"].to(device, non_blocking=True),
            "labels": x["labels"].to(device),
            "index": rows.to(device),
            **self._teacher_outputs(x, device),
            **extra,
        }
