"""CRD: Contrastive Representation Distillation (Tian, Krishnan, Isola, ICLR 2020).

As in the paper and its reference code (RepDistiller ``crd/``): each side goes through a linear
head and L2 normalisation (``Embed``); the critic is h(t, s) = P / (P + N * Pn) with
P = exp(t.s / tau) / Z, Pn = 1/M (M = number of train rows), Z fixed from the first batch
(Z = mean(exp(t.s / tau)) * M over the positive and negative scores); the NCE loss is
-E[log h(pos)] - N * E[log(1 - h(neg))] (``ContrastLoss``); both directions are used:
(a) the student anchor against the teacher side, (b) the teacher anchor against a momentum
memory of student features.

``mode`` says what the teacher side of (a) is:
- ``reference``: as RepDistiller's ``CRDLoss``: a momentum memory of teacher features too
  (``memory_t``, updated after the step like the student memory), read detached, so the
  teacher head learns from (b) only; no precomputed teacher embeddings are needed (the teacher's
  current embedding comes with the batch). Negatives given with the batch (``contrast_idx``) or
  drawn uniformly.
- ``exact`` (default): no teacher memory; the positive is the current teacher embedding of the
  anchor and the negatives' raw teacher embeddings are read from the teacher bank and projected
  with the current teacher head (only the distinct rows). ``teacher_head_grad`` says whether (a)
  trains the teacher head (``both``) or not (``teacher_anchor``, the reference's behaviour).
- ``relax``: as ``exact`` with another sample of the anchor's class as the positive.

Everywhere: the memories are :class:`~ensemble_kd.blocks.memory.MomentumMemory` objects kept identical on
every worker; Z is all-reduce-averaged over workers so every worker uses the same Z; drawn
negatives come from :class:`~ensemble_kd.blocks.memory.NegativeSampler`; an ensemble gets one CRD term
per teacher, each with its own heads, memories and Z; the heads, scores, Z and NCE run in float32
(float64 if the inputs are float64) even under autocast. docs/methods/crd.md lists every
difference from the reference and the test that pins the rest to it.

Metrics, per teacher: ``crd/<teacher>/loss_a|loss_b`` (the two directions, unweighted) and
``crd/<teacher>/z_a|z_b`` (the fixed Z of each direction; -1 before the first batch).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.core import dist
from ensemble_kd.core.rows import full
from ensemble_kd.losses._util import as_float, module_keys
from ensemble_kd.losses.base import (LOSSES, DistillInputs, LossContext, LossOutput, NeedsStoredEmbeddings,
                                     normalise_teacher_weights)
from ensemble_kd.losses.functional import crd_scores, nce_loss, nce_z
from ensemble_kd.blocks.memory import SPARSE_DRAW, MomentumMemory, NegativeSampler, stable_seed

MODES = ("exact", "relax", "reference")
TEACHER_HEAD_GRADS = ("teacher_anchor", "both")
NEGATIVES = ("auto", "uniform", "class-aware", "hard")


class Embed(nn.Module):
    """The reference ``Embed``: Linear, then L2 normalisation. (B, d_in) -> (B, feat_dim)."""

    def __init__(self, dim_in: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)  # (B, feat_dim)


class CRDTerm(nn.Module):
    """One teacher's CRD term: heads, memories, fixed Z for both directions.

    ``memory``: the student-feature memory (the reference's ``memory_v1``); ``memory_t``: the
    teacher-feature memory (``memory_v2``), ``reference`` mode only (None otherwise).
    ``z``: (2,) buffer, [Z of (a) student anchor vs teacher side, Z of (b) teacher anchor vs
    student memory]; -1 until set from the first batch.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_rows: int, feat_dim: int,
                 momentum: float, seed: int, teacher_seed: int | None = None) -> None:
        super().__init__()
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        self.memory = MomentumMemory(num_rows, feat_dim, momentum=momentum, seed=seed)
        self.memory_t = (None if teacher_seed is None
                         else MomentumMemory(num_rows, feat_dim, momentum=momentum, seed=teacher_seed))
        self.register_buffer("z", torch.full((2,), -1.0))
        # which Z entries are known to be fixed, kept on the host so that a step does not read
        # the (device) buffer back: one read per process, again after a state is loaded
        self.z_fixed = [False, False]
        self.register_load_state_dict_post_hook(_forget_z_fixed)


def _forget_z_fixed(term: CRDTerm, incompatible_keys) -> None:
    """load_state_dict replaced ``z``: read it once again rather than trust the host copy."""
    term.z_fixed = [False, False]


def _forget_host_step(loss: CRDLoss, incompatible_keys) -> None:
    """load_state_dict replaced ``step``: read it once again rather than trust the host copy."""
    loss.host_step = None


@dataclass
class Draws:
    """One batch's contrastive rows for one teacher."""

    pos: torch.Tensor  # (B,) row of each anchor's positive
    uniq: torch.Tensor  # (U,) the distinct negative rows
    neg_index: torch.Tensor | None  # (B, N) column in `uniq` of each negative; None: (B, U) scored, weighted by counts
    counts: torch.Tensor | None  # (U,) draws of each distinct row (shared), (B, U) of each anchor's; None: neg_index
    valid: torch.Tensor | None  # (B, N) | (B, U) bool: which negatives count; None: all
    all_rows: bool = False  # uniq is every row, 0..M-1 (memories are read whole)

    def rows(self, memory: MomentumMemory) -> torch.Tensor:
        """(U, F) the memory's rows of ``uniq``."""
        return memory.table() if self.all_rows else memory.gather(self.uniq)


def _check_options(mode: str, tau: float, feat_dim: int, num_negatives: int, negatives: str,
                   teacher_head_grad: str) -> None:
    if mode not in MODES:
        raise ValueError(f"crd: mode must be one of {MODES}, got {mode!r}")
    if tau <= 0:
        raise ValueError(f"crd: tau must be > 0, got {tau}")
    if feat_dim < 1 or int(feat_dim) != feat_dim:
        raise ValueError(f"crd: feat_dim must be an integer >= 1, got {feat_dim}")
    if num_negatives < 1 or int(num_negatives) != num_negatives:
        raise ValueError(f"crd: num_negatives must be an integer >= 1, got {num_negatives}")
    if negatives not in NEGATIVES:
        raise ValueError(f"crd: negatives must be one of {NEGATIVES}, got {negatives!r}")
    if teacher_head_grad not in TEACHER_HEAD_GRADS:
        raise ValueError(f"crd: teacher_head_grad must be one of {TEACHER_HEAD_GRADS}, got {teacher_head_grad!r}")
    if mode == "reference" and teacher_head_grad == "both":
        raise ValueError("crd: teacher_head_grad 'both' needs mode exact or relax: in reference mode the "
                         "student-anchor direction reads the detached teacher memory")


BANK_DEVICE_SHARE = 0.25  # at most this share of a device's memory holds an exact-mode teacher bank
HOST_GATHER_ROWS = 65_536  # rows gathered per chunk on the host when the bank stays there


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether a bank of ``nbytes`` may live on ``device`` (a CUDA device: within
    :data:`BANK_DEVICE_SHARE` of its memory; any other device: yes)."""
    if device.type != "cuda":
        return True
    return nbytes <= BANK_DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory


def host_gather(bank: Any, rows: torch.Tensor) -> torch.Tensor:
    """rows (...) -> (..., d_t) gathered from a host bank in chunks of :data:`HOST_GATHER_ROWS`
    (bounded host memory whatever the batch), then sent to rows' device."""
    flat = rows.reshape(-1).cpu()  # (R,)
    out = torch.cat([torch.as_tensor(bank[flat[i:i + HOST_GATHER_ROWS]])
                     for i in range(0, len(flat), HOST_GATHER_ROWS)]) if len(flat) else torch.empty(0, bank.shape[1])
    return out.reshape(*rows.shape, -1).to(rows.device, non_blocking=True)  # (..., d_t)


@LOSSES.register("crd", needs_teachers=True, paper="Tian et al., ICLR 2020", sweep_axes=("tau", "num_negatives"))
class CRDLoss(nn.Module):
    """CRD over one or more teachers: sum_t w_t * (loss_a + loss_b), see the module docstring.

    In training mode each call also updates every teacher's memories at rows ``x.index`` (after
    the loss is computed, with the detached projected features) and advances ``step`` (a saved
    buffer that seeds the negative sampling; kept rather than ``x.step`` so that a restored
    checkpoint replays the same draws and eval passes draw without advancing it). ``x.contrast_idx``
    (B, 1+N), when given, replaces the draws: column 0 the positives, the rest the negatives, all
    counted. Subclasses may override :meth:`anchor_weights` to weight each anchor and
    :meth:`weight_metrics` to log them (GACD).
    """

    def __init__(self, ctx: LossContext, *, feat_dim: PositiveInt = 128, tau: PositiveFloat = 0.07, num_negatives: PositiveInt = 16384,
                 momentum: Annotated[float, Field(ge=0, le=1)] = 0.5, mode: str = "reference", negatives: str = "auto",
                 per_sample: bool = True, teacher_weights: Mapping[str, float] | None = None,
                 hard_pool: PositiveInt = 512, use_gpu_faiss: bool = False, teacher_head_grad: str = "teacher_anchor") -> None:
        super().__init__()
        _check_options(mode, tau, feat_dim, num_negatives, negatives, teacher_head_grad)
        if negatives == "auto":  # the reference draws uniformly; the paper's exact CRD, class-aware
            negatives = "uniform" if mode == "reference" else "class-aware"
        self.ctx_bank = ctx.bank
        self._bank_on: dict[tuple[str, str], torch.Tensor] = {}  # (teacher, device) -> the bank's embeddings there
        self.feat_dim, self.tau, self.mode = int(feat_dim), float(tau), mode
        self.num_negatives, self.num_rows = int(num_negatives), ctx.num_rows
        self.teacher_head_grad = teacher_head_grad
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self._key = module_keys("crd", self.teachers)
        # exact/relax project the bank's teacher embeddings; FAISS hard negatives search them
        self._check_bank(ctx, need=mode != "reference" or negatives == "hard")
        self.terms = nn.ModuleDict()
        self.samplers: dict[str, NegativeSampler] = {}
        for name in self.teachers:
            t_seed = stable_seed(ctx.seed, "crd-teacher-memory", name) if mode == "reference" else None
            self.terms[self._key[name]] = CRDTerm(ctx.student_dim, ctx.teacher_dims[name], ctx.num_rows, feat_dim,
                                                  momentum, stable_seed(ctx.seed, "crd-memory", name), t_seed)
            self.samplers[name] = NegativeSampler(ctx.bank.embeddings.get(name), ctx.bank.labels, mode=negatives,
                                                  num_negatives=num_negatives, per_sample=per_sample,
                                                  seed=stable_seed(ctx.seed, "crd-neg", name),
                                                  hard_pool=hard_pool, use_gpu=use_gpu_faiss)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.host_step: int | None = None  # the step buffer's value on the host (None: read it once)
        self.register_load_state_dict_post_hook(_forget_host_step)
        self.to(ctx.device)

    def _check_bank(self, ctx: LossContext, need: bool) -> None:
        """The bank's teacher embeddings, where present (or needed), are (M, d_t) per teacher."""
        missing = [n for n in self.teachers if n not in ctx.bank.embeddings]
        if need and missing:
            raise NeedsStoredEmbeddings(f"CRD: teacher bank has no embeddings for {missing}; it has {ctx.bank.teachers} "
                             "(mode 'reference' with negatives other than 'hard' needs none)")
        for name in self.teachers:
            emb = ctx.bank.embeddings.get(name)
            if emb is not None and (emb.shape[0] != ctx.num_rows or emb.shape[1] != ctx.teacher_dims[name]):
                raise ValueError(f"CRD: bank embeddings of {name!r} are {tuple(emb.shape)}, expected "
                                 f"({ctx.num_rows}, {ctx.teacher_dims[name]})")

    def current_step(self) -> int:
        """The step that seeds this batch's draws, without reading the device buffer every step."""
        if self.host_step is None:
            self.host_step = int(self.step)
        return self.host_step

    def anchor_weights(self, name: str, x: DistillInputs) -> torch.Tensor | None:
        """Per-anchor weights (B,) for teacher ``name``'s terms; None = uniform (plain CRD)."""
        return None

    def weight_metrics(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metrics of the anchor weights ``w`` (B,) of teacher ``name`` (none for plain CRD)."""
        return {}

    def _set_z(self, term: CRDTerm, which: int, pos: torch.Tensor, neg: torch.Tensor,
               counts: torch.Tensor | None = None) -> None:
        if term.z_fixed[which]:
            return
        if float(term.z[which]) < 0:  # first batch: fix Z, identical on every worker
            c = None if counts is None else counts.to(pos.dtype)  # (U,)
            z = dist.all_reduce_mean(nce_z(pos, neg, self.num_rows, c).reshape(1))
            term.z[which] = z.to(term.z)[0]
        term.z_fixed[which] = True

    def _teacher_raw(self, name: str, x: DistillInputs, index: torch.Tensor) -> torch.Tensor:
        """(B, d_t) the teacher's embedding of the batch: from the batch, else from the bank."""
        t_raw = x.teacher_emb.get(name)
        if t_raw is not None:
            return t_raw
        if self.ctx_bank.embeddings.get(name) is None:
            raise ValueError(f"CRD: the batch has no embedding of teacher {name!r} and the teacher bank holds none")
        return self.bank_rows(name, index)

    def bank_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """rows (...) int64 -> (..., d_t) the bank's raw teacher embeddings of ``rows``, gathered on
        rows' device: the bank is copied there once (M x d_t, kept out of the state dict) when it
        fits in :data:`BANK_DEVICE_SHARE` of the device's memory, so a step sends no indices to the
        host and no rows back; a bigger bank stays on the host and the rows are gathered there in
        chunks (:func:`host_gather`: one index copy and one row copy a step)."""
        bank = self.ctx_bank.embeddings[name]
        if rows.device.type == "cpu":
            return bank[rows]
        key = (name, str(rows.device))
        got = self._bank_on.get(key)
        if got is None:
            if not fits_on(rows.device, len(bank) * bank.shape[1] * 4):
                return host_gather(bank, rows)
            got = self._bank_on[key] = full(bank).to(rows.device)  # (M, d_t)
        return got[rows]

    def draws(self, name: str, x: DistillInputs, index: torch.Tensor, step: int) -> Draws:
        """The positives and negatives of teacher ``name``'s term: given (``x.contrast_idx``) or drawn."""
        if x.contrast_idx is not None:
            ci = x.contrast_idx.to(device=index.device, dtype=torch.int64)  # (B, 1+N)
            if ci.shape != (index.shape[0], 1 + self.num_negatives):
                raise ValueError(f"CRD: contrast_idx must be (B, 1+N) = ({index.shape[0]}, {1 + self.num_negatives}), "
                                 f"got {tuple(ci.shape)}")
            if self.mode == "exact" and not torch.equal(ci[:, 0], index):
                raise ValueError("CRD: in mode 'exact' the positive (contrast_idx[:, 0]) must be the anchor's own row")
            uniq, inv = torch.unique(ci[:, 1:], return_inverse=True)  # (U,), (B, N)
            return Draws(ci[:, 0], uniq, inv, None, None)  # the reference counts every given column
        sampler = self.samplers[name]
        neg, _ = sampler.sample(index, step, with_valid=False)  # (B, N) per anchor (every draw counts) | (N,)
        pos = sampler.sample_positives(index, step) if self.mode == "relax" else index  # (B,)
        if neg.dim() == 2 and neg.numel() >= self.num_rows:
            # B x N per-anchor draws reach about every row anyway: score all M rows once and weight
            # each by how often the anchor drew it, (B, M) work instead of (B, N) (the same loss)
            B, M = neg.shape[0], self.num_rows
            key = neg.add_(torch.arange(0, B * M, M, device=neg.device)[:, None]).reshape(-1)  # (B*N,) anchor-major row ids (in place: the draws are ours)
            counts = torch.bincount(key, minlength=B * M).reshape(B, M)  # (B, M) draws of each row per anchor
            return Draws(pos, torch.arange(M, device=neg.device), None, counts, None, all_rows=True)
        if neg.dim() == 2:
            uniq, inv = torch.unique(neg, return_inverse=True)  # (U,), (B, N)
            return Draws(pos, uniq, inv, None, None)
        # Shared negatives: N draws from M rows repeat rows (N = 16384 > M here). Score each
        # distinct row once and weight it by its count: the same loss and Z, (B, U) work. A
        # bincount over the M rows finds them in O(N + M), where sorting the N draws costs more.
        if neg.numel() * SPARSE_DRAW < self.num_rows:  # a bank far larger than the draws: O(N log N), not O(M)
            uniq, counts = torch.unique(neg, sorted=True, return_counts=True)  # (U,) ascending, (U,)
        else:
            per_row = torch.bincount(neg, minlength=self.num_rows)  # (M,) draws of each row
            uniq = per_row.nonzero().squeeze(1)  # (U,) the distinct rows, ascending
            counts = per_row[uniq]  # (U,)
        return Draws(pos, uniq, None, counts, sampler.valid_mask(index, uniq.to(index.device)),  # valid (B, U)
                     all_rows=uniq.numel() == self.num_rows)

    def teacher_side(self, term: CRDTerm, name: str, d: Draws, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Direction (a)'s teacher side: positives (B, F) and the negatives' table (U, F)."""
        if term.memory_t is not None:  # reference: the teacher memory, detached
            return term.memory_t.gather(d.pos).to(t.dtype), d.rows(term.memory_t).to(t.dtype)
        detach = self.teacher_head_grad == "teacher_anchor"
        # detached: as the reference, the teacher head learns from the teacher-anchor direction
        # only; no graph is kept for the (U, F) projections then
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            t_neg = term.embed_t(self.bank_rows(name, d.uniq).to(t))  # (U, F) current head
            t_pos = term.embed_t(self.bank_rows(name, d.pos).to(t)) if self.mode == "relax" else t  # (B, F)
        return (t_pos.detach(), t_neg.detach()) if detach else (t_pos, t_neg)

    def _direction(self, term: CRDTerm, which: int, anchor: torch.Tensor, pos: torch.Tensor,
                   neg: torch.Tensor, d: Draws, w: torch.Tensor | None, mult: torch.Tensor | None) -> torch.Tensor:
        """One NCE direction: anchor (B, F) vs pos (B, F) and the negatives' table (U, F);
        ``mult`` (B, U) | (U,): shared negatives' counts, the invalid ones zeroed (None: per anchor)."""
        pos_sc, neg_sc = crd_scores(anchor, pos, neg, self.tau, neg_index=d.neg_index)  # (B,), (B, N|U)
        self._set_z(term, which, pos_sc, neg_sc, d.counts)
        z = term.z[which].clone()  # a copy: the other direction's _set_z writes into the same buffer
        if mult is not None:
            return nce_loss(pos_sc, neg_sc, self.num_rows, weights=w, z=z, counts=mult)
        return nce_loss(pos_sc, neg_sc, self.num_rows, valid=d.valid, weights=w, z=z)

    def teacher_loss(self, name: str, x: DistillInputs) -> LossOutput:
        """loss_a + loss_b of one teacher, with its metrics; updates its memories in training mode."""
        term: CRDTerm = self.terms[self._key[name]]
        f_s = as_float(x.student_emb)  # (B, d_s) at least float32
        index = x.index.to(device=f_s.device, dtype=torch.int64)  # (B,)
        s = term.embed_s(f_s)  # (B, F)
        t = term.embed_t(self._teacher_raw(name, x, index).to(f_s))  # (B, F)
        d = self.draws(name, x, index, self.current_step())
        t_pos, t_neg = self.teacher_side(term, name, d, t)  # (B, F), (U, F)
        s_pos, s_neg = term.memory.gather(d.pos).to(s.dtype), d.rows(term.memory).to(s.dtype)  # (B, F), (U, F)
        w = self.anchor_weights(name, x)  # (B,) or None
        mult = None  # shared negatives: each distinct row's count where it counts for the anchor, else 0
        if d.counts is not None:  # once for both directions (they share the draws)
            c = d.counts.to(s.dtype)  # (U,)
            mult = c if d.valid is None else d.valid.to(s.dtype) * c  # (U,) | (B, U)
        loss_a = self._direction(term, 0, s, t_pos, t_neg, d, w, mult)  # (a) student anchor vs teacher side
        loss_b = self._direction(term, 1, t, s_pos, s_neg, d, w, mult)  # (b) teacher anchor vs student memory
        if self.training:
            term.memory.update(index, s.detach())
            if term.memory_t is not None:
                term.memory_t.update(index, t.detach())
        metrics = {f"crd/{name}/loss_a": loss_a.detach(), f"crd/{name}/loss_b": loss_b.detach()}
        if w is not None:
            metrics.update(self.weight_metrics(name, w))
        return LossOutput(loss_a + loss_b, metrics)

    def forward(self, x: DistillInputs) -> LossOutput:
        # exp(dot / tau) with tau ~ 0.07 spans e^-14..e^14 and NCE subtracts near-equal logs:
        # bf16/fp16 would lose it, so autocast is off here and everything runs in >= float32
        with torch.autocast(x.student_emb.device.type, enabled=False):
            total = x.student_emb.new_zeros((), dtype=as_float(x.student_emb).dtype)
            metrics: dict[str, torch.Tensor] = {}
            for name in self.teachers:
                if self.weights[name] == 0.0:
                    continue
                out = self.teacher_loss(name, x)
                total = total + self.weights[name] * out.loss
                metrics.update(out.metrics)
        for name in self.teachers:
            # clone: z is a buffer written in place (once); a metric must not change after it is returned
            z = self.terms[self._key[name]].z.detach().clone()  # (2,)
            metrics[f"crd/{name}/z_a"], metrics[f"crd/{name}/z_b"] = z[0], z[1]
        if self.training:
            self.host_step = self.current_step() + 1
            self.step += 1
        return LossOutput(total, metrics)
