"""CRD: Contrastive Representation Distillation (Tian, Krishnan, Isola, ICLR 2020).

As in the paper and its reference code (RepDistiller ``crd/``): each side goes through a linear
head and L2 normalisation (``Embed``); the critic is h(t, s) = P / (P + N * Pn) with
P = exp(t.s / tau) / Z, Pn = 1/M (M = number of train rows), Z fixed from the first batch
(Z = mean(exp(t.s / tau)) * M over the positive and negative scores); the NCE loss is
-E[log h(pos)] - N * E[log(1 - h(neg))] (``ContrastLoss``); both directions are used.

Differences from the reference, on purpose:
- the teacher side is EXACT: no teacher memory; the negatives' raw teacher embeddings are read
  from the teacher bank and projected with the current teacher head (only the unique rows);
- the student side is a :class:`~ensemble_kd.memory.MomentumMemory` kept identical on every
  worker; Z is all-reduce-averaged over workers so every worker uses the same Z;
- negatives come from :class:`~ensemble_kd.memory.NegativeSampler` (class-aware by default);
- an ensemble gets one CRD term per teacher, each with its own heads, memory and Z.

Metrics, per teacher: ``crd/<teacher>/loss_a|loss_b`` (the two directions, unweighted) and
``crd/<teacher>/z_a|z_b`` (the fixed Z of each direction; -1 before the first batch).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd import dist
from ensemble_kd.losses._util import module_keys
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.memory import MomentumMemory, NegativeSampler, stable_seed

EPS = 1e-7  # as the reference ContrastLoss


def crd_scores(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float,
               neg_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised critic scores exp(dot / tau) (the reference ``ContrastMemory`` output before
    dividing by Z).

    anchor (B, D), positive (B, D); negatives (B, N, D) per anchor, or (N, D) shared by the batch.
    With ``neg_index`` given, ``negatives`` is a table (U, D) and neg_index (B, N) or (N,) picks
    its rows (dots are computed once per table row, then gathered: no (B, N, D) tensor).
    Returns pos (B,), neg (B, N).
    """
    pos = (anchor * positive).sum(-1)  # (B,)
    if neg_index is not None:
        table = anchor @ negatives.t()  # (B, U)
        if neg_index.dim() == 1:
            neg = table[:, neg_index]  # (B, N)
        else:
            neg = torch.gather(table, 1, neg_index)  # (B, N)
    elif negatives.dim() == 2:
        neg = anchor @ negatives.t()  # (B, N)
    else:
        neg = torch.bmm(negatives, anchor.unsqueeze(-1)).squeeze(-1)  # (B, N)
    return torch.exp(pos / tau), torch.exp(neg / tau)


def nce_z(pos_score: torch.Tensor, neg_score: torch.Tensor, n_data: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's normalising constant: Z = mean(exp(dot/tau)) * M over the (B, 1+N)
    scores of one batch. pos (B,), neg (B, N) -> scalar (detached). With ``counts`` (U,),
    neg is (B, U) and column u stands for counts[u] identical negatives (N = counts.sum())."""
    if counts is None:
        return torch.cat([pos_score.detach()[:, None], neg_score.detach()], dim=1).mean() * n_data  # over (B, 1+N)
    B, N = pos_score.shape[0], float(counts.sum())
    total = pos_score.detach().sum() + (neg_score.detach() * counts[None, :]).sum()  # sum over the (B, 1+N) scores
    return total / (B * (1.0 + N)) * n_data


def nce_loss(pos_score: torch.Tensor, neg_score: torch.Tensor, n_data: int,
             valid: torch.Tensor | None = None, weights: torch.Tensor | None = None,
             z: float | torch.Tensor = 1.0, counts: torch.Tensor | None = None) -> torch.Tensor:
    """CRD's NCE loss (reference ``ContrastLoss``), averaged over the B anchors.

    pos_score (B,), neg_score (B, N): exp(dot/tau) as from :func:`crd_scores`; P = score / z.
    n_data: M (noise distribution Pn = 1/M). valid (B, N) bool or None (all valid): invalid
    negatives contribute 0 and N_i = number of valid negatives of anchor i. weights (B,) or None:
    multiply each anchor's term (GACD); the sum is still divided by B. counts (U,) or None: the
    compact form of shared negatives drawn with repeats: neg_score/valid are (B, U) over the
    distinct rows and column u counts counts[u] times (exactly the expanded loss, U/N the work).

        log D1_i  = log(P_pos_i / (P_pos_i + N_i*Pn + eps))
        log D0_ij = log(N_i*Pn / (P_neg_ij + N_i*Pn + eps))
        loss      = -(1/B) * sum_i w_i * (log D1_i + sum_{j valid} log D0_ij)

    Returns a scalar.
    """
    B, N = neg_score.shape
    pn = 1.0 / float(n_data)
    p_pos, p_neg = pos_score / z, neg_score / z  # (B,), (B, N)
    c = torch.ones(N, dtype=p_neg.dtype, device=p_neg.device) if counts is None else counts.to(p_neg)  # (N|U,)
    if valid is None:
        m = c.sum().expand(B, 1).to(p_neg.dtype)  # (B, 1)
    else:
        valid = valid.to(torch.bool)
        m = (valid.to(p_neg.dtype) * c).sum(1, keepdim=True)  # (B, 1) valid negatives per anchor
    log_d1 = torch.log(p_pos / (p_pos + m[:, 0] * pn + EPS))  # (B,)
    num = (m * pn).clamp_min(torch.finfo(p_neg.dtype).tiny)  # (B, 1) no log(0) on empty rows
    log_d0 = torch.log(num / (p_neg + m * pn + EPS))  # (B, N)
    if valid is not None:
        log_d0 = torch.where(valid, log_d0, torch.zeros_like(log_d0))
    per_anchor = log_d1 + (log_d0 * c).sum(1)  # (B,)
    if weights is not None:
        per_anchor = per_anchor * weights.to(per_anchor)
    return -per_anchor.sum() / B


class Embed(nn.Module):
    """The reference ``Embed``: Linear, then L2 normalisation. (B, d_in) -> (B, feat_dim)."""

    def __init__(self, dim_in: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)  # (B, feat_dim)


class CRDTerm(nn.Module):
    """One teacher's CRD term: heads, student memory, fixed Z for both directions.

    ``z``: (2,) buffer, [Z of (a) student anchor vs teacher, Z of (b) teacher anchor vs student
    memory]; -1 until set from the first batch.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_rows: int, feat_dim: int,
                 momentum: float, seed: int) -> None:
        super().__init__()
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        self.memory = MomentumMemory(num_rows, feat_dim, momentum=momentum, seed=seed)
        self.register_buffer("z", torch.full((2,), -1.0))


@LOSSES.register("crd", needs_teachers=True, paper="Tian et al., ICLR 2020", sweep_axes=("tau", "num_negatives"))
class CRDLoss(nn.Module):
    """CRD over one or more teachers: sum_t w_t * (loss_a + loss_b), see the module docstring.

    In training mode each call also updates every teacher's student memory at rows ``x.index``
    (after the loss is computed, with the detached student features) and advances ``step`` (a
    saved buffer that seeds the negative sampling; kept rather than ``x.step`` so that a restored
    checkpoint replays the same draws and eval passes draw without advancing it). Subclasses may
    override :meth:`anchor_weights` to weight each anchor and :meth:`weight_metrics` to log them (GACD).
    """

    def __init__(self, ctx: LossContext, *, feat_dim: int = 128, tau: float = 0.07, num_negatives: int = 16384,
                 momentum: float = 0.5, mode: str = "exact", negatives: str = "class-aware",
                 per_sample: bool = True, teacher_weights: Mapping[str, float] | None = None,
                 hard_pool: int = 512, use_gpu_faiss: bool = False) -> None:
        super().__init__()
        if mode not in ("exact", "relax"):
            raise ValueError(f"crd: mode must be 'exact' or 'relax', got {mode!r}")
        if tau <= 0:
            raise ValueError(f"crd: tau must be > 0, got {tau}")
        if feat_dim < 1 or int(feat_dim) != feat_dim:
            raise ValueError(f"crd: feat_dim must be an integer >= 1, got {feat_dim}")
        if num_negatives < 1 or int(num_negatives) != num_negatives:
            raise ValueError(f"crd: num_negatives must be an integer >= 1, got {num_negatives}")
        self.ctx_bank = ctx.bank
        self.feat_dim, self.tau, self.mode = int(feat_dim), float(tau), mode
        self.num_negatives, self.num_rows = int(num_negatives), ctx.num_rows
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self._key = module_keys("crd", self.teachers)
        missing = [n for n in self.teachers if n not in ctx.bank.embeddings]
        if missing:
            raise ValueError(f"CRD: teacher bank has no embeddings for {missing}; it has {ctx.bank.teachers}")
        self.terms = nn.ModuleDict()
        self.samplers: dict[str, NegativeSampler] = {}
        for name in self.teachers:
            emb = ctx.bank.embeddings[name]
            if emb.shape[0] != ctx.num_rows or emb.shape[1] != ctx.teacher_dims[name]:
                raise ValueError(f"CRD: bank embeddings of {name!r} are {tuple(emb.shape)}, expected "
                                 f"({ctx.num_rows}, {ctx.teacher_dims[name]})")
            self.terms[self._key[name]] = CRDTerm(ctx.student_dim, ctx.teacher_dims[name], ctx.num_rows,
                                                  feat_dim, momentum, stable_seed(ctx.seed, "crd-memory", name))
            self.samplers[name] = NegativeSampler(emb, ctx.bank.labels, mode=negatives, num_negatives=num_negatives,
                                                  per_sample=per_sample, seed=stable_seed(ctx.seed, "crd-neg", name),
                                                  hard_pool=hard_pool, use_gpu=use_gpu_faiss)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.to(ctx.device)

    def anchor_weights(self, name: str, x: DistillInputs) -> torch.Tensor | None:
        """Per-anchor weights (B,) for teacher ``name``'s terms; None = uniform (plain CRD)."""
        return None

    def weight_metrics(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metrics of the anchor weights ``w`` (B,) of teacher ``name`` (none for plain CRD)."""
        return {}

    def _set_z(self, term: CRDTerm, which: int, pos: torch.Tensor, neg: torch.Tensor,
               counts: torch.Tensor | None = None) -> None:
        if float(term.z[which]) < 0:  # first batch: fix Z, identical on every worker
            z = dist.all_reduce_mean(nce_z(pos, neg, self.num_rows, counts).reshape(1))
            term.z[which] = z.to(term.z)[0]

    def teacher_loss(self, name: str, x: DistillInputs) -> LossOutput:
        """loss_a + loss_b of one teacher, with its metrics; updates its memory in training mode."""
        term: CRDTerm = self.terms[self._key[name]]
        sampler = self.samplers[name]
        bank = self.ctx_bank.embeddings[name]
        device = x.student_emb.device
        index = x.index.to(device=device, dtype=torch.int64)  # (B,)
        step = int(self.step)
        t_raw = x.teacher_emb.get(name)
        if t_raw is None:
            t_raw = bank[index.cpu()]
        t_raw = t_raw.to(device=device, dtype=x.student_emb.dtype)  # (B, d_t)

        s = term.embed_s(x.student_emb)  # (B, F)
        t = term.embed_t(t_raw)  # (B, F)
        neg_idx, valid = sampler.sample(index, step)  # (B, N) | (N,), (B, N)
        uniq, inv = torch.unique(neg_idx, return_inverse=True)  # (U,), same shape as neg_idx
        t_neg = term.embed_t(bank[uniq.cpu()].to(device=device, dtype=t_raw.dtype))  # (U, F) current head
        if self.mode == "relax":
            pos_idx = sampler.sample_positives(index, step)  # (B,) same-class rows
            t_pos = term.embed_t(bank[pos_idx.cpu()].to(device=device, dtype=t_raw.dtype))  # (B, F)
        else:
            pos_idx, t_pos = index, t  # (B,), (B, F)
        s_pos = term.memory.gather(pos_idx).to(s.dtype)  # (B, F)
        s_neg = term.memory.gather(uniq).to(s.dtype)  # (U, F)

        w = self.anchor_weights(name, x)  # (B,) or None
        if neg_idx.dim() == 1:
            # Shared negatives: N draws from M rows repeat rows (N = 16384 > M here). Score each
            # distinct row once and weight it by its count: the same loss and Z, (B, U) work.
            neg_index, counts = None, torch.bincount(inv, minlength=uniq.numel()).to(s.dtype)  # (U,)
            valid = sampler.valid_mask(index, uniq.to(index.device))  # (B, U)
        else:
            neg_index, counts = inv, None
        # (a) student anchor vs teacher positive / negatives (exact teacher side)
        pos_a, neg_a = crd_scores(s, t_pos, t_neg, self.tau, neg_index=neg_index)  # (B,), (B, N|U)
        # (b) teacher anchor vs student memory positive / negatives
        pos_b, neg_b = crd_scores(t, s_pos, s_neg, self.tau, neg_index=neg_index)  # (B,), (B, N|U)
        self._set_z(term, 0, pos_a, neg_a, counts)
        self._set_z(term, 1, pos_b, neg_b, counts)
        loss_a = nce_loss(pos_a, neg_a, self.num_rows, valid=valid, weights=w, z=term.z[0], counts=counts)
        loss_b = nce_loss(pos_b, neg_b, self.num_rows, valid=valid, weights=w, z=term.z[1], counts=counts)
        if self.training:
            term.memory.update(index, s.detach())
        metrics = {f"crd/{name}/loss_a": loss_a.detach(), f"crd/{name}/loss_b": loss_b.detach()}
        if w is not None:
            metrics.update(self.weight_metrics(name, w))
        return LossOutput(loss_a + loss_b, metrics)

    def forward(self, x: DistillInputs) -> LossOutput:
        total = x.student_emb.new_zeros(())
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
            self.step += 1
        return LossOutput(total, metrics)
