"""Labels on a subset (``distill.labels``): which train samples keep their label, and what the
other rows are labelled with.

The draw is over the dataset's train *samples* (not shard rows: the stored views of one sample
are all labelled or all not), stratified by class: each class gets a share of the labelled
samples proportional to its size (largest remainder; on a balanced dataset ``count / classes``
each), and within a class the samples are a seeded random choice. It depends only on the
samples' labels, the setting and the seed, so every arm of one seed trains on the same labelled
samples (a paired comparison), and each seed on its own.

Unlabelled rows still need a class for what reads labels other than as ground truth (CRD's and
GACD's class-aware negatives, GACD's confidence weights, DKD's target class): they carry the
teachers' ensemble prediction, the argmax of the mean of the run's teachers' softmax outputs (one
teacher: its own prediction). A run without teachers has no prediction to give: its unlabelled
rows carry :data:`UNLABELLED` and only the (masked) supervised terms read labels there.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ensemble_kd.core.config import LabelsConfig

UNLABELLED = -1
"""The label of an unlabelled row when the run has no teacher to predict one."""


def draw_seed(cfg: LabelsConfig, seed: int) -> int:
    """The seed of the draw: ``labels.seed``, else the run's seed (``distill.seed``)."""
    return int(seed if cfg.seed is None else cfg.seed)


def num_labelled(cfg: LabelsConfig, num_samples: int) -> int:
    """How many samples keep their label: ``count``, or ``fraction`` of them rounded (at least 1)."""
    if cfg.count is not None:
        if cfg.count > num_samples:
            raise ValueError(f"distill.labels.count: {cfg.count} is more than the {num_samples} train samples")
        return int(cfg.count)
    if cfg.fraction is not None:
        return max(1, int(round(cfg.fraction * num_samples)))
    return num_samples


def class_quotas(class_sizes: Sequence[int], total: int) -> np.ndarray:
    """(K,) labelled samples per class: proportional to ``class_sizes`` (K,), summing to ``total``,
    the remainder going to the largest fractional parts (ties: the lower class)."""
    sizes = np.asarray(class_sizes, dtype=np.int64)
    exact = total * sizes / sizes.sum()  # (K,)
    q = np.floor(exact).astype(np.int64)
    order = sorted(range(len(sizes)), key=lambda k: (-(exact[k] - q[k]), k))
    for k in order[: total - int(q.sum())]:
        q[k] += 1
    return np.minimum(q, sizes)


def draw_labelled(labels: np.ndarray, cfg: LabelsConfig, seed: int) -> np.ndarray:
    """(N,) bool: which of N samples (class ``labels`` (N,)) keep their label; all True without a subset."""
    labels = np.asarray(labels).reshape(-1)
    if not cfg.subset:
        return np.ones(labels.shape[0], dtype=bool)
    total = num_labelled(cfg, labels.shape[0])
    classes, sizes = np.unique(labels, return_counts=True)  # (K,), (K,)
    rng = np.random.default_rng([draw_seed(cfg, seed) & 0xFFFFFFFF, 0x1AB])  # its own stream, not the init's
    keep = np.zeros(labels.shape[0], dtype=bool)
    for c, q in zip(classes, class_quotas(sizes, total)):
        members = np.flatnonzero(labels == c)  # ascending positions of class c
        keep[rng.choice(members, size=int(q), replace=False)] = True
    return keep


def labelled_rows(row_sample_ids: np.ndarray | torch.Tensor, sample_ids: np.ndarray, labels: np.ndarray,
                  cfg: LabelsConfig, seed: int) -> torch.Tensor:
    """(R,) bool over training rows (shard rows or dataset rows, by their ``row_sample_ids``): the
    rows of the samples (``sample_ids`` (N,) with class ``labels`` (N,)) that :func:`draw_labelled` keeps."""
    keep = draw_labelled(labels, cfg, seed)
    rows = np.asarray(row_sample_ids).reshape(-1)
    return torch.from_numpy(np.isin(rows, np.asarray(sample_ids)[keep]))


def ensemble_prediction(teacher_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """K tensors (M, C) -> (M,) int64: the argmax of the teachers' mean softmax probabilities."""
    p = torch.stack([torch.softmax(t.float(), dim=1) for t in teacher_logits]).mean(0)  # (M, C)
    return p.argmax(1)


def row_labels(true_labels: torch.Tensor, labelled: torch.Tensor, teacher_logits: Mapping[str, torch.Tensor]
               ) -> torch.Tensor:
    """(M,) int64: the ground truth on labelled rows (``labelled`` (M,) bool), elsewhere the
    teachers' ensemble prediction from ``teacher_logits`` (name -> (M, C)), or :data:`UNLABELLED`
    without teachers."""
    if teacher_logits:
        other = ensemble_prediction(list(teacher_logits.values())).to(true_labels.device)  # (M,)
    else:
        other = torch.full_like(true_labels, UNLABELLED)
    return torch.where(labelled.to(true_labels.device), true_labels.long(), other.long())
