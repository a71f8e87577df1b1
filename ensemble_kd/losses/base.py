"""The loss contract. Every distillation method is a pure function (the formula) plus one
``nn.Module`` class registered by name in :data:`LOSSES`; the training loop builds the configured
losses through :func:`build_loss` and calls each one the same way, so it never branches on a
method name.

Registering: decorate the class itself,

    @LOSSES.register("kd", needs_teachers=True, paper="Hinton et al., 2015")
    class KDLoss(nn.Module):
        def __init__(self, ctx: LossContext, *, temperature: float = 4.0, ...) -> None: ...

The constructor takes the :class:`LossContext` first, then keyword-only options, each with a
default (no ``**kwargs``): config validation reads the options from ``inspect.signature(cls)``
(skipping ``ctx``), and :class:`LossRegistry` refuses a class of another shape at import time.
Option values are checked in the constructor, which raises ``ValueError`` naming the loss and the
option. Trainable parts (CRD heads, VID regressors, DFND's Q) and buffers (CRD's memory) live
in the module, which the loop puts into the one trainable module next to the student. They are
trained by the run's optimiser (``distill.optim``) unless the loss declares other settings for
some of them: a method ``param_groups(self) -> list[dict]`` returning torch optimiser parameter
groups (``{"params": [...], "lr": ..., "weight_decay": ...}``: the options it gives override the
run's; the schedule scales every group's lr alike), gathered by :func:`optimizer_param_groups`
(DFND's noise matrix: its own lr, no weight decay).

Calling: ``module(x: DistillInputs) -> LossOutput``. ``LossOutput.loss`` is the term's 0-d
value, unweighted (the loop multiplies by the configured weight and sums the terms);
``LossOutput.metrics`` maps a name (``<loss>/<teacher>/<what>``, e.g. ``crd/t0/z_a``) to a
detached 0-d tensor on the loss's device. Metrics stay tensors so that a step never waits for
the device; the loop averages each one over an epoch's steps and reads them once.

:class:`DistillInputs` holds one batch of B rows: the student's embedding and logits (with
grad), the labels, each row's index in the train shards (its memory slot), the teachers'
embeddings and logits of those rows, and the position in training (``epoch``, 0-based, and
``step``, the global optimisation step) for losses with a schedule (DKD's warm-up); when a
configured loss declares ``needs=(..., "feature_maps")`` in its registration, the student's and the
teachers' stage outputs (the encoders' ``forward_features``; the online data path only); and
optionally ``contrast_idx``, contrastive rows given with the batch (CRD; drawn by the loss when None);
and ``labelled``, which rows keep their ground-truth label when only some do (``distill.labels``:
``labels`` is the teachers' ensemble prediction on the others; a loss that reads labels as
ground truth averages over the labelled rows only, as CE does).

``reduction``, wherever a loss has it, means one thing: how a multi-teacher loss combines its
teachers (:data:`REDUCTIONS`).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ensemble_kd.blocks.bank import TeacherBank
from ensemble_kd.core.errors import ProjectError
from modalities.registry import Registry

__all__ = ["LOSSES", "REDUCTIONS", "DistillInputs", "LossContext", "LossOutput", "LossRegistry", "NeedsStoredEmbeddings", "Reduction",
           "TeacherBank", "build_loss", "check_reduction", "loss_options", "normalise_teacher_weights",
           "optimizer_param_groups"]


@dataclass
class DistillInputs:
    """What the loop hands every loss for one batch (B samples/views)."""

    student_emb: torch.Tensor  # (B, d_s) penultimate student feature
    student_logits: torch.Tensor  # (B, C)
    labels: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) int64: row of each sample in the train shards = its memory slot
    teacher_emb: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, d_t)
    teacher_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, C)
    epoch: int = 0  # 0-based epoch of this batch
    step: int = 0  # global optimisation step since the start of training (0 for the first batch)
    student_feats: list[torch.Tensor] | None = None  # the student's stage outputs [..., (B, d_s)] (feature-map losses)
    teacher_feats: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> stage outputs (online path)
    # (B, 1+N) int64 or None: contrastive rows given with the batch (RepDistiller's contrast_idx):
    # column 0 each anchor's positive row, the rest its N negative rows; None = the loss draws them
    contrast_idx: torch.Tensor | None = None
    # (B,) bool or None: rows that keep their ground-truth label (``distill.labels``); None = every row.
    # ``labels`` holds the ground truth where True and the teachers' ensemble prediction elsewhere:
    # supervised terms (CE) read only the True rows, teacher terms every row
    labelled: torch.Tensor | None = None


class NeedsStoredEmbeddings(ValueError, ProjectError):
    """A loss whose options need the teachers' stored embeddings of every train row (the shard
    path's bank), built where the bank has none (the online path)."""


@dataclass
class LossOutput:
    """What every loss returns for one batch."""

    loss: torch.Tensor  # () the term's value; the loop applies the configured weight and sums
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> () detached, on the loss's device

    def __post_init__(self) -> None:
        # Shape and autograd flags are host-side metadata: checking them costs no device sync.
        if self.loss.dim() != 0:
            raise ValueError(f"LossOutput.loss must be a 0-d tensor, got shape {tuple(self.loss.shape)}")
        bad = [k for k, v in self.metrics.items() if not isinstance(v, torch.Tensor) or v.dim() != 0 or v.requires_grad]
        if bad:
            raise ValueError(f"LossOutput.metrics must be detached 0-d tensors; not so: {bad}")


@dataclass
class LossContext:
    """What a loss constructor may use to size itself."""

    student_dim: int
    num_classes: int
    teacher_dims: dict[str, int]
    bank: TeacherBank
    seed: int = 0
    device: torch.device = torch.device("cpu")
    # Per-sample shapes of each encoder's ``forward_features`` outputs (the stage maps (C, H, W), then
    # the embedding (d,)), for feature-map losses that size connectors/regressors (FitNet's, AB's, FT's,
    # VID's) as the reference does from a dry forward; filled by the loop on the online path, else None.
    student_feat_shapes: tuple[tuple[int, ...], ...] | None = None
    teacher_feat_shapes: Mapping[str, tuple[tuple[int, ...], ...]] | None = None  # teacher name -> as above
    selection: Mapping[str, Any] | None = None  # the manifest of the selection the run trains on (DFND), if any

    @property
    def teachers(self) -> list[str]:
        return list(self.teacher_dims)

    @property
    def num_rows(self) -> int:
        return self.bank.num_rows


NEEDS = ("feature_maps",)
"""What a loss may declare it reads besides logits and embeddings (registry metadata ``needs``)."""

Reduction = Literal["mean_probs", "per_teacher"]
REDUCTIONS: tuple[str, ...] = ("mean_probs", "per_teacher")
"""How a multi-teacher loss combines its teachers: ``mean_probs`` = one term against the
teachers' (weighted) averaged prediction; ``per_teacher`` = the weighted sum of one term per teacher."""


def check_reduction(loss: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{loss}: reduction must be 'mean_probs' or 'per_teacher', got {reduction!r}")


def _check_loss_class(name: str, cls: Any) -> None:
    """Refuse, at registration, a loss that does not have the contract's shape (see module doc)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"loss {name!r}: register an nn.Module subclass, got {cls!r}")
    params = list(inspect.signature(cls).parameters.values())
    if not params or params[0].name != "ctx" or params[0].kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
        raise TypeError(f"loss {name!r}: the constructor's first parameter must be `ctx: LossContext`")
    bad = [p.name for p in params[1:] if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is p.empty]
    if bad:
        raise TypeError(f"loss {name!r}: options must be keyword-only with a default, "
                        f"__init__(self, ctx, *, option=default); not so: {bad}")


class LossRegistry(Registry[type[nn.Module]]):
    """The loss registry: ``register`` also checks the metadata and the class's shape."""

    def register(self, name: str, **meta: Any) -> Callable[[type[nn.Module]], type[nn.Module]]:
        if not isinstance(meta.get("needs_teachers"), bool) or not meta.get("paper"):
            raise TypeError(f"loss {name!r}: register with needs_teachers=<bool> and paper=<citation>")
        unknown = set(meta.get("needs", ())) - set(NEEDS)
        if unknown:
            raise TypeError(f"loss {name!r}: unknown needs {sorted(unknown)}; known: {list(NEEDS)}")
        add = super().register(name, **meta)

        def deco(cls: type[nn.Module]) -> type[nn.Module]:
            _check_loss_class(name, cls)
            return add(cls)

        return deco


LOSSES = LossRegistry("loss")
"""Registered loss classes. Metadata: ``needs_teachers`` (bool), ``paper`` (citation string),
optionally ``needs`` (what the loss reads besides logits and embeddings: ``"feature_maps"``, the
encoders' stage outputs, which only the online data path provides) and,
optionally, ``sweep_axes`` (the two options a sweep of this loss is plotted against, e.g. CRD's
``("tau", "num_negatives")``: the x axis, then one line per value)."""


def build_loss(name: str, ctx: LossContext, **options: Any) -> nn.Module:
    """An instance of loss ``name``; unknown options and a teacher-less run of a loss that needs
    teachers are refused with a ValueError naming the loss."""
    cls = LOSSES.get(name)
    if LOSSES.meta(name)["needs_teachers"] and not ctx.teacher_dims:
        raise ValueError(f"loss {name!r} needs at least one teacher, and this run has none")
    known = list(loss_options(name))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"loss {name!r}: bad options {unknown}; its options are {known}")
    return cls(ctx, **options)


def loss_options(name: str) -> dict[str, Any]:
    """Option name -> default of registered loss ``name`` (its constructor's keyword-only options)."""
    return {p.name: p.default for p in list(inspect.signature(LOSSES.get(name)).parameters.values())[1:]}  # [0] is ctx


def normalise_teacher_weights(names: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Normalised per-teacher weights (uniform when None); errors name unknown teachers."""
    if not weights:
        return {n: 1.0 / len(names) for n in names}
    unknown = set(weights) - set(names)
    if unknown:
        raise ValueError(f"teacher weights name unknown teachers {sorted(unknown)}; teachers are {names}")
    w = {n: float(weights.get(n, 0.0)) for n in names}
    total = sum(w.values())
    if total <= 0 or any(v < 0 for v in w.values()):
        raise ValueError(f"teacher weights must be >= 0 and not all 0, got {w}")
    return {n: v / total for n, v in w.items()}


def optimizer_param_groups(module: nn.Module, losses: Iterable[nn.Module]) -> list[dict[str, Any]]:
    """The optimiser's parameter groups for ``module`` (everything trainable, ``losses`` among its
    submodules): first every trainable parameter no loss claims, with the run's settings, then the
    groups the losses declare with ``param_groups()`` (see the module doc). A declared parameter
    must be a trainable parameter of ``module`` and be declared once."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    declared: list[dict[str, Any]] = []
    claimed: set[int] = set()
    for loss in losses:
        declare = getattr(loss, "param_groups", None)
        if not callable(declare):
            continue
        for group in declare():
            params = list(group["params"])
            for p in params:
                if id(p) not in trainable or id(p) in claimed:
                    raise ValueError(f"{type(loss).__name__}.param_groups: a parameter of shape {tuple(p.shape)} "
                                     "is not a trainable parameter of the module, or is declared twice")
                claimed.add(id(p))
            declared.append({**group, "params": params})
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in claimed]
    return [{"params": rest}, *declared]
