"""The distillation formulas, each written once as a pure function with the reference's semantics.

RepDistiller (github.com/HobbitLong/RepDistiller, ``distiller_zoo/`` and ``crd/``) is the
reference; tests/test_reference_*.py replay its own outputs (tests/fixtures/repdistiller/). The
registered loss modules (one per method, ``ensemble_kd/losses/<method>.py``) call these; nothing
here is trainable or stateful (CRD's memory update returns the new rows instead of writing them).

Conventions: B batch, C channels, H x W a feature map, d a flattened feature size. Every function
computes in at least float32 (:func:`as_float`: half/bfloat16 inputs are upcast, float64 stays
float64, as the golden tests need). Where the reference lets the gradient flow into the teacher
side (KD, hint, AT, SP, NST, FSP, PKT, CC) so does the function: a caller whose teacher is frozen
simply has no gradient to use there; where the reference detaches the teacher (RKD) so does the
function.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ensemble_kd.losses._util import as_float
from ensemble_kd.blocks.memory import memory_update  # CRD's memory update (applied by MomentumMemory, a lower layer)

__all__ = ["at", "attention_map", "cc", "crd_scores", "fsp", "fsp_matrices", "hint", "kd", "kd_to_target",
           "memory_update", "nce_loss", "nce_z", "nst", "pkt", "pool_to_smaller", "rkd", "sp", "sp_gram", "vid",
           "vid_variance"]


def _pair(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides in at least float32, the teacher in the student's dtype."""
    s = as_float(f_s)
    return s, as_float(f_t).to(s.dtype)


def _flat(f: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, d): the reference's ``f.view(B, -1)``."""
    return f.reshape(f.shape[0], -1)


# -- logits -----------------------------------------------------------------------------------
def kd_to_target(y_s: torch.Tensor, p_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_t || softmax(y_s / T)), summed over the C classes and averaged over the batch.

    y_s (B, C) student logits; p_t (B, C) a target distribution already at temperature T (one
    teacher's softmax(y_t / T), or an ensemble's average of them). Returns a scalar."""
    T = float(temperature)
    log_p_s = F.log_softmax(as_float(y_s) / T, dim=1)  # (B, C)
    return F.kl_div(log_p_s, p_t.to(log_p_s.dtype), reduction="sum") * (T * T) / y_s.shape[0]


def kd(y_s: torch.Tensor, y_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD, the reference's ``DistillKL``: y_s, y_t (B, C) logits -> scalar
    T^2 * sum_{b,c} p_t log(p_t / p_s) / B with p = softmax(y / T) (the gradient reaches y_t too)."""
    y_s, y_t = _pair(y_s, y_t)
    return kd_to_target(y_s, F.softmax(y_t / float(temperature), dim=1), temperature)


# -- embeddings / one feature pair --------------------------------------------------------------
def hint(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """FitNets hint, the reference's ``HintLoss`` (``nn.MSELoss``): f_s, f_t of one shape (B, ...),
    f_s already through the regressor -> scalar mean of (f_s - f_t)^2 over every element."""
    if f_s.shape != f_t.shape:
        raise ValueError(f"hint: the regressed student {tuple(f_s.shape)} and the teacher {tuple(f_t.shape)} differ")
    return F.mse_loss(*_pair(f_s, f_t))


def sp_gram(f: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B): the batch Gram matrix of the flattened rows, each row L2-normalised
    (``F.normalize``'s eps = 1e-12), as the reference's ``Similarity``."""
    f = _flat(f)  # (B, d)
    return F.normalize(f @ f.t(), p=2, dim=1)


def sp(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Similarity preserving for one pair, the reference's ``Similarity.similarity_loss``:
    f_s (B, ...), f_t (B, ...) -> scalar ||G_t - G_s||_F^2 / B^2.

    Maps (B, C, H, W) or embeddings (B, d) alike; channels and sizes may differ, and nothing is
    pooled: the Gram is (B, B) whatever the sizes (the reference flattens each map as it is)."""
    f_s, f_t = _pair(f_s, f_t)
    B = f_s.shape[0]
    diff = sp_gram(f_t) - sp_gram(f_s)  # (B, B)
    return (diff * diff).sum() / (B * B)


def pkt(f_s: torch.Tensor, f_t: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer, the reference's ``PKT.cosine_similarity_loss``:
    f_s (B, d_s), f_t (B, d_t) (flattened if more dims) -> scalar
    mean_{i,j} p^t_ij log((p^t_ij + eps) / (p^s_ij + eps)), p_ij = K_ij / sum_j K_ij,
    K = (cos + 1) / 2 over the batch, the diagonal kept (the (B, B) mean: per-row KL / B)."""
    f_s, f_t = _pair(f_s, f_t)

    def probs(f: torch.Tensor) -> torch.Tensor:
        f = _flat(f)
        f = f / (f.norm(dim=1, keepdim=True) + eps)  # (B, d) unit rows (eps: a zero row stays 0)
        k = (f @ f.t() + 1.0) / 2.0  # (B, B) cosine similarity scaled to [0, 1]
        return k / k.sum(dim=1, keepdim=True)  # (B, B) p_{j|i}

    p_s, p_t = probs(f_s), probs(f_t)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


def _pdist(f: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, d) -> (B, B) Euclidean distances (squared ones clamped at eps before the root), the
    diagonal set to exactly 0: the reference's ``RKDLoss.pdist``."""
    sq = f.pow(2).sum(1)  # (B,)
    d = (sq[:, None] + sq[None, :] - 2.0 * f @ f.t()).clamp(min=eps).sqrt()  # (B, B)
    return d.masked_fill(torch.eye(f.shape[0], dtype=torch.bool, device=f.device), 0.0)


def _rkd_distance(f: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, d) -> (B, B) distances over their mean over the pairs at distance > 0."""
    d = _pdist(f, eps)
    return d / d[d > 0].mean()


def _rkd_angle(f: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, B, B): [j, i, k] = <e_ij, e_kj>, e_ij the unit vector from f_j to f_i (the
    reference's layout; the zero vectors i = j stay 0)."""
    e = F.normalize(f[None, :, :] - f[:, None, :], p=2, dim=2)  # (B, B, d): [j, i] ~ f_i - f_j
    return torch.bmm(e, e.transpose(1, 2))  # (B, B, B)


def rkd(f_s: torch.Tensor, f_t: torch.Tensor, w_d: float = 25.0, w_a: float = 50.0, *,
        eps: float = 1e-12) -> torch.Tensor:
    """Relational KD, the reference's ``RKDLoss``: f_s (B, d_s), f_t (B, d_t) (flattened if more
    dims; B >= 2) -> scalar w_d * smooth_l1(psi_D^s, psi_D^t) + w_a * smooth_l1(psi_A^s, psi_A^t),
    the means over all B^2 pairs / B^3 triplets (zero diagonals included). The teacher's
    relations are computed under no_grad, as there: no gradient reaches f_t."""
    s, t = (_flat(f) for f in _pair(f_s, f_t))
    with torch.no_grad():  # the teacher's relations are targets
        t_d, t_a = _rkd_distance(t, eps), _rkd_angle(t)  # (B, B), (B, B, B)
    loss = s.new_zeros(())
    if w_d:
        loss = loss + w_d * F.smooth_l1_loss(_rkd_distance(s, eps), t_d)
    if w_a:
        loss = loss + w_a * F.smooth_l1_loss(_rkd_angle(s), t_a)
    return loss


def cc(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Correlation congruence, the reference's ``Correlation`` (f_s, f_t already embedded to one
    dim d by the method's linear heads): (B, d), (B, d) -> scalar
    mean_{b < B-1} sum_c |f_s - f_t|_{b,c} |f_s - f_t|_{b+1,c} (consecutive rows of the batch)."""
    if f_s.shape != f_t.shape:
        raise ValueError(f"cc: student {tuple(f_s.shape)} and teacher {tuple(f_t.shape)} must be embedded to one shape")
    f_s, f_t = _pair(f_s, f_t)
    delta = (_flat(f_s) - _flat(f_t)).abs()  # (B, d)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def vid_variance(log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(C,) -> (C,) the predicted variance softplus(log_scale) + eps (the reference's ``pred_var``)."""
    return F.softplus(as_float(log_scale)) + eps


def vid(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VID's Gaussian negative log-likelihood after the regressor, the reference's ``VIDLoss``:
    pred_mean, target (B, C, ...) (maps (B, C, H, W) or embeddings (B, C), one shape), log_scale (C,)
    -> scalar mean over every element of 0.5 * ((pred_mean - target)^2 / var + log var),
    var = softplus(log_scale) + eps the per-channel VARIANCE (constant 0.5 log 2 pi left out)."""
    if pred_mean.shape != target.shape:
        raise ValueError(f"vid: the prediction {tuple(pred_mean.shape)} and the target {tuple(target.shape)} differ")
    mu, t = _pair(pred_mean, target)
    var = vid_variance(log_scale, eps).to(mu.dtype)  # (C,)
    var = var.view(1, -1, *([1] * (mu.dim() - 2)))  # broadcast over channel dim 1
    return torch.mean(0.5 * ((mu - t) ** 2 / var + torch.log(var)))


# -- feature maps -------------------------------------------------------------------------------
def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the L2-normalised spatial attention mean_c |f|^p (Zagoruyko &
    Komodakis; the reference's ``Attention.at``: ``f.pow(p).mean(1)``, signed for odd p as there)."""
    return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two (B, C, H, W) maps average-pooled to the smaller's square size (the
    reference's rule for maps of different resolutions; it assumes square maps)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def at(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer for one pair of maps: f_s (B, C_s, H_s, W_s), f_t (B, C_t, H_t, W_t)
    (channels may differ; the larger map is pooled to the smaller) -> scalar
    mean_{b, hw} (at(f_s) - at(f_t))^2 (the reference's ``Attention.at_loss``; the gradient flows
    into both sides, as there)."""
    f_s, f_t = pool_to_smaller(*_pair(f_s, f_t))
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def nst(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer for one pair of maps, the reference's ``NSTLoss.nst_loss``:
    f_s (B, C_s, H_s, W_s), f_t (B, C_t, H_t, W_t) (the larger pooled to the smaller) -> scalar
    MMD^2 with the polynomial kernel k(a, b) = (a . b)^2 between the channels' L2-normalised
    spatial responses: mean k(t, t) + mean k(s, s) - 2 mean k(s, t), each mean over (B, C, C').
    The teacher-teacher term is detached, as there (the cross term still reaches f_t)."""
    f_s, f_t = pool_to_smaller(*_pair(f_s, f_t))
    s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)  # (B, C_s, HW)
    t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)  # (B, C_t, HW)

    def poly(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(b, a.transpose(1, 2)).pow(2)  # (B, C_b, C_a): (b_j . a_i)^2

    return poly(t, t).mean().detach() + poly(s, s).mean() - 2 * poly(s, t).mean()


def fsp_matrices(g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The FSP ("flow of solution procedure") matrices of one side, the reference's
    ``FSP.compute_fsp``: maps g[i] (B, C_i, H_i, W_i) -> for each consecutive pair (i, i+1), the
    larger pooled to the smaller, (B, C_{i+1}, C_i) with [b, k, j] = mean_hw g[i+1]_k g[i]_j."""
    out = []
    for bot, top in zip(g[:-1], g[1:]):
        bot, top = pool_to_smaller(bot, top)
        bot = bot.reshape(bot.shape[0], bot.shape[1], -1)  # (B, C_i, HW)
        top = top.reshape(top.shape[0], top.shape[1], -1)  # (B, C_{i+1}, HW)
        out.append(torch.bmm(top, bot.transpose(1, 2)) / bot.shape[2])  # (B, C_{i+1}, C_i)
    return out


def fsp(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """FSP, the reference's ``FSP.forward``: g_s, g_t lists of L maps (B, C_i, H_i, W_i) whose
    channels agree side to side (the reference checks the shapes) -> L - 1 scalars, one per
    consecutive pair: mean over (B, C_{i+1}, C_i) of (FSP_s - FSP_t)^2 (the gradient reaches both
    sides, as there)."""
    if len(g_s) != len(g_t) or len(g_s) < 2:
        raise ValueError(f"fsp: needs two lists of >= 2 maps of one length, got {len(g_s)} and {len(g_t)}")
    g_s = [as_float(f) for f in g_s]
    g_t = [as_float(f).to(g_s[0].dtype) for f in g_t]
    m_s, m_t = fsp_matrices(g_s), fsp_matrices(g_t)
    for i, (a, b) in enumerate(zip(m_s, m_t)):
        if a.shape != b.shape:
            raise ValueError(f"fsp: pair {i}: the student's FSP matrix is {tuple(a.shape)}, the teacher's "
                             f"{tuple(b.shape)}: the channels must agree (as the reference)")
    return [(a - b).pow(2).mean() for a, b in zip(m_s, m_t)]


# -- CRD (Tian et al., ICLR 2020; the reference's crd/memory.py ContrastMemory, crd/criterion.py) ---
NCE_EPS = 1e-7  # the reference ContrastLoss's eps


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
    # in place: the dots are fresh tensors that no backward needs (mm, gather and sum keep their
    # inputs), so exp(dot / tau) costs no new (B, N) buffers; the values are those of the
    # out-of-place form, bit for bit
    return pos.div_(tau).exp_(), neg.div_(tau).exp_()


def nce_z(pos_score: torch.Tensor, neg_score: torch.Tensor, n_data: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's normalising constant: Z = mean(exp(dot/tau)) * M over the (B, 1+N)
    scores of one batch. pos (B,), neg (B, N) -> scalar (detached). With ``counts`` (U,),
    neg is (B, U) and column u stands for counts[u] identical negatives (N = counts.sum()); with
    ``counts`` (B, U), per anchor, each row of counts sums to N."""
    if counts is None:
        return torch.cat([pos_score.detach()[:, None], neg_score.detach()], dim=1).mean() * n_data  # over (B, 1+N)
    c = counts if counts.dim() == 2 else counts[None, :]  # (B | 1, U)
    B = pos_score.shape[0]
    N = float(c.sum()) / c.shape[0]  # per anchor
    total = pos_score.detach().sum() + (neg_score.detach() * c).sum()  # sum over the (B, 1+N) scores
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
    counts may also be (B, U), per anchor, with ``valid`` folded in (0 where a negative does not
    count): the same loss, without the mask passes (CRD computes it once for both directions).

        log D1_i  = log(P_pos_i / (P_pos_i + N_i*Pn + eps))
        log D0_ij = log(N_i*Pn / (P_neg_ij + N_i*Pn + eps))
        loss      = -(1/B) * sum_i w_i * (log D1_i + sum_{j valid} log D0_ij)

    Returns a scalar.
    """
    B, N = neg_score.shape
    pn = 1.0 / float(n_data)
    dt = neg_score.dtype
    z = torch.as_tensor(z, dtype=dt, device=neg_score.device)
    c = None if counts is None else counts.to(neg_score)  # (U,) | (B, U)
    if c is not None and c.dim() == 2:
        if valid is not None:
            raise ValueError("nce_loss: per-anchor counts (B, U) already hold the valid mask; pass valid=None")
        m = c.sum(1, keepdim=True)  # (B, 1) valid negatives per anchor
    elif valid is None:
        m = (torch.full((B, 1), float(N), dtype=dt, device=neg_score.device) if c is None
             else c.sum().expand(B, 1))  # (B, 1)
    else:
        valid = valid.to(torch.bool)
        vf = valid.to(dt)
        m = (vf if c is None else vf * c).sum(1, keepdim=True)  # (B, 1) valid negatives per anchor
    k = m * pn + NCE_EPS  # (B, 1) N_i*Pn + eps
    p_pos = pos_score / z  # (B,)
    log_d1 = torch.log(p_pos / (p_pos + k[:, 0]))  # (B,)
    # log D0_ij = log(num_i / k_i) - log1p(P_neg_ij / k_i), num_i = N_i*Pn: one fused pass over the
    # (B, N) scores (mul, log1p, sum) instead of seven, and no large terms that cancel in float32
    log_den = torch.log1p(neg_score * (1.0 / (z * k)))  # (B, N)
    if valid is not None:
        log_den = torch.where(valid, log_den, 0.0)
    den = (log_den * c).sum(1) if c is not None else log_den.sum(1)  # (B,)
    num = (m[:, 0] * pn).clamp_min(torch.finfo(dt).tiny)  # (B,) no log(0) on empty rows
    log_d0_sum = m[:, 0] * torch.log(num / k[:, 0]) - den  # (B,)
    per_anchor = log_d1 + log_d0_sum  # (B,)
    if weights is not None:
        per_anchor = per_anchor * weights.to(per_anchor)
    return -per_anchor.sum() / B


# Feature-map methods (FT, AB)
# The formulas only FT and AB use; their trainable parts and stages live in ft.py and ab.py.

def factor(f: torch.Tensor, p1: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): FT's factor, normalize(mean_c f^p1) (the reference's
    ``FactorTransfer.factor``; the same map as AT's attention)."""
    return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))


def ft(factor_s: torch.Tensor, factor_t: torch.Tensor, p1: float = 2.0, p2: float = 1.0) -> torch.Tensor:
    """Factor transfer for one pair: the translator's output (B, C_s', H_s, W_s) and the paraphraser's
    factor (B, C_t', H_t, W_t) (the larger pooled to the smaller) -> scalar
    mean_{b,hw} |factor(s) - factor(t)|^p2 (the reference's ``FactorTransfer.factor_loss``: p1 = 2,
    p2 = 1, the L1 distance; the absolute value is taken only for p2 = 1, as there)."""
    factor_s, factor_t = pool_to_smaller(as_float(factor_s), as_float(factor_t))
    diff = factor(factor_s, p1) - factor(factor_t, p1)  # (B, H*W)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


def ab_criterion(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """AB's alternative L2 for one pair of equal-shape maps (the reference's ``criterion_alternative_l2``):
    source (B, C, H, W) the connector's output from the student, target the teacher's map ->
    scalar sum over every element of (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]:
    the student's neuron is pushed past the margin on the side where the teacher's is (in)active."""
    source, target = as_float(source), as_float(target)
    off = (source + margin).pow(2) * ((source > -margin) & (target <= 0)).to(source.dtype)
    on = (source - margin).pow(2) * ((source <= margin) & (target > 0)).to(source.dtype)
    return (off + on).abs().sum()


def ab(g_s: list[torch.Tensor], g_t: list[torch.Tensor], margin: float = 1.0) -> list[torch.Tensor]:
    """AB over n stage pairs (connected student maps, teacher maps), one value per pair as the
    reference's ``ABLoss.forward``: ab_criterion * 2^(i - n + 1) / B * 3 / 1000 (the deepest
    pair weighs 1, each shallower one half the next)."""
    if len(g_s) != len(g_t):
        raise ValueError(f"ab: {len(g_s)} student maps and {len(g_t)} teacher maps: they must pair up")
    n, bsz = len(g_s), g_s[0].shape[0]
    return [2.0 ** (i - n + 1) * ab_criterion(s, t, margin) / bsz / 1000 * 3 for i, (s, t) in enumerate(zip(g_s, g_t))]
