"""CRD (Tian et al., ICLR 2020): golden NCE value, Z, masks/weights, and the CRDLoss module."""
from __future__ import annotations

import math

import pytest
import torch

from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, TeacherBank, build_loss, loss_options
from ensemble_kd.losses.crd import CRDLoss
from ensemble_kd.losses.functional import crd_scores, nce_loss, nce_z

EPS = 1e-7


def _golden(pos, neg, M, z, valid=None, weights=None):
    """The reference ContrastLoss, written out in plain python."""
    B = len(pos)
    total = 0.0
    for i in range(B):
        vi = [True] * len(neg[i]) if valid is None else valid[i]
        m = sum(vi)
        pn = 1.0 / M
        pp = pos[i] / z
        term = math.log(pp / (pp + m * pn + EPS))
        for j, s in enumerate(neg[i]):
            if vi[j]:
                term += math.log(m * pn / (s / z + m * pn + EPS))
        total += (1.0 if weights is None else weights[i]) * term
    return -total / B


# fixed numbers: B=2 anchors, N=3 negatives, D=4
ANCHOR = [[0.5, -0.5, 0.5, 0.5], [0.1, 0.7, -0.1, 0.7]]
POSITIVE = [[0.6, -0.4, 0.4, 0.57], [0.0, 0.8, 0.0, 0.6]]
NEGS = [[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [-0.5, 0.5, 0.5, -0.5]],
        [[0.0, 0.0, 1.0, 0.0], [0.6, 0.0, 0.8, 0.0], [0.0, 0.0, 0.0, -1.0]]]
TAU, M = 0.5, 10


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_golden_value():
    pos_s = [math.exp(_dot(ANCHOR[i], POSITIVE[i]) / TAU) for i in range(2)]
    neg_s = [[math.exp(_dot(ANCHOR[i], n) / TAU) for n in NEGS[i]] for i in range(2)]
    z = 3.0
    expected = _golden(pos_s, neg_s, M, z)
    a, p, n = (torch.tensor(v, dtype=torch.float64) for v in (ANCHOR, POSITIVE, NEGS))
    pos, neg = crd_scores(a, p, n, TAU)
    assert pos.shape == (2,) and neg.shape == (2, 3)
    assert torch.allclose(pos, torch.tensor(pos_s, dtype=torch.float64))
    assert torch.allclose(neg, torch.tensor(neg_s, dtype=torch.float64))
    got = nce_loss(pos, neg, M, z=z)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(1.9649, abs=1e-4)  # pinned, checked by hand
    # float32 too
    got32 = nce_loss(pos.float(), neg.float(), M, z=z)
    assert got32.item() == pytest.approx(expected, rel=1e-5)


def test_scores_shared_and_indexed_negatives_agree():
    a, p, n = (torch.tensor(v, dtype=torch.float64) for v in (ANCHOR, POSITIVE, NEGS))
    shared = n[0]  # (N, D) for both anchors
    pos1, neg1 = crd_scores(a, p, shared, TAU)
    pos2, neg2 = crd_scores(a, p, shared[None].expand(2, -1, -1), TAU)
    assert torch.allclose(neg1, neg2) and torch.allclose(pos1, pos2)
    table = torch.cat([n[0], n[1]])  # (6, D)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    _, neg3 = crd_scores(a, p, table, TAU, neg_index=idx)
    _, neg4 = crd_scores(a, p, n, TAU)
    assert torch.allclose(neg3, neg4)
    _, neg5 = crd_scores(a, p, table, TAU, neg_index=torch.tensor([0, 1, 2]))
    assert torch.allclose(neg5, neg1)


def test_z_from_first_batch():
    pos = torch.tensor([1.0, 3.0])
    neg = torch.tensor([[2.0, 4.0, 6.0], [1.0, 1.0, 2.0]])
    z = nce_z(pos, neg, 100)
    assert z.item() == pytest.approx((1 + 3 + 2 + 4 + 6 + 1 + 1 + 2) / 8 * 100)
    # Z scales P: nce_loss(score, z) == nce_loss(score / z, 1)
    assert nce_loss(pos, neg, 100, z=z).item() == pytest.approx(nce_loss(pos / z, neg / z, 100).item(), rel=1e-6)


def test_valid_mask_and_weights():
    pos = [2.0, 0.5, 1.5]
    neg = [[1.0, 3.0, 0.2, 0.7], [0.1, 0.4, 2.5, 1.1], [0.9, 0.9, 0.3, 5.0]]
    valid = [[True, False, True, True], [True, True, True, True], [False, False, True, False]]
    w = [0.5, 2.0, 1.0]
    pt, nt = torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)
    vt, wt = torch.tensor(valid), torch.tensor(w, dtype=torch.float64)
    got = nce_loss(pt, nt, 50, valid=vt, weights=wt, z=2.0)
    assert got.item() == pytest.approx(_golden(pos, neg, 50, 2.0, valid, w), rel=1e-9)
    # an invalid negative is as if it were not there
    per_anchor = [nce_loss(pt[i:i + 1], nt[i:i + 1, vt[i]], 50, z=2.0).item() for i in range(3)]
    assert nce_loss(pt, nt, 50, valid=vt, z=2.0).item() == pytest.approx(sum(per_anchor) / 3, rel=1e-9)
    # changing an invalid score changes nothing; weights of 1 are the unweighted loss
    nt2 = nt.clone()
    nt2[0, 1] = 1e6
    assert nce_loss(pt, nt2, 50, valid=vt, z=2.0).item() == pytest.approx(nce_loss(pt, nt, 50, valid=vt, z=2.0).item())
    assert nce_loss(pt, nt, 50, weights=torch.ones(3)).item() == pytest.approx(nce_loss(pt, nt, 50).item())
    # an anchor with no valid negative: finite loss and gradients
    ptg = pt.clone().requires_grad_(True)
    ntg = nt.clone().requires_grad_(True)
    v0 = vt.clone()
    v0[2] = False
    loss = nce_loss(ptg, ntg, 50, valid=v0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(ptg.grad).all() and torch.isfinite(ntg.grad).all()
    assert (ntg.grad[~v0] == 0).all()


# -- the module ------------------------------------------------------------------------------
def make_ctx(num_teachers=1, M=60, C=4, d_s=12, seed=0, teacher_emb=None):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(M) % C
    dims = {f"t{k}": 6 + 2 * k for k in range(num_teachers)}
    emb = teacher_emb or {n: torch.randn(M, d, generator=g) for n, d in dims.items()}
    dims = {n: e.shape[1] for n, e in emb.items()}
    bank = TeacherBank(embeddings=emb, logits={n: torch.randn(M, C, generator=g) for n in emb},
                       labels=labels, sample_ids=torch.arange(M))
    return LossContext(student_dim=d_s, num_classes=C, teacher_dims=dims, bank=bank, seed=seed)


def make_inputs(ctx, index, student_emb=None, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    B = index.shape[0]
    s = student_emb if student_emb is not None else torch.randn(B, ctx.student_dim, generator=g)
    return DistillInputs(student_emb=s, student_logits=torch.randn(B, ctx.num_classes, generator=g),
                         labels=ctx.bank.labels[index], index=index,
                         teacher_emb={n: e[index] for n, e in ctx.bank.embeddings.items()},
                         teacher_logits={n: lg[index] for n, lg in ctx.bank.logits.items()})


@pytest.mark.parametrize("num_teachers", [1, 3])
def test_forward_backward_grads_reach_every_head(num_teachers):
    ctx = make_ctx(num_teachers)
    loss_mod = build_loss("crd", ctx, feat_dim=8, num_negatives=32)
    assert isinstance(loss_mod, CRDLoss) and LOSSES.meta("crd")["needs_teachers"]
    x = make_inputs(ctx, torch.tensor([0, 5, 9, 17, 22, 40]))
    x.student_emb.requires_grad_(True)
    out = loss_mod(x)
    loss = out.loss
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    heads = [n for n, p in loss_mod.named_parameters()]
    assert len(heads) == 4 * num_teachers  # 2 Linear (weight, bias) per teacher
    for n, p in loss_mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert x.student_emb.grad is not None and torch.isfinite(x.student_emb.grad).all()
    assert set(loss_mod.terms.keys()) == set(ctx.teacher_dims)
    assert set(out.metrics) == {f"crd/{n}/{k}" for n in ctx.teacher_dims for k in ("loss_a", "loss_b", "z_a", "z_b")}
    for k, v in out.metrics.items():
        assert v.shape == () and not v.requires_grad and torch.isfinite(v), k
    # the weighted parts add up to the loss (uniform weights 1/K), and Z was set from this batch
    parts = sum(out.metrics[f"crd/{n}/loss_a"] + out.metrics[f"crd/{n}/loss_b"] for n in ctx.teacher_dims)
    assert torch.allclose(parts / num_teachers, loss.detach(), rtol=1e-5)
    assert all(float(out.metrics[f"crd/{n}/z_{d}"]) > 0 for n in ctx.teacher_dims for d in "ab")


def test_memory_updated_at_batch_rows_only_and_state_dict():
    ctx = make_ctx(2)
    loss_mod = CRDLoss(ctx, feat_dim=8, num_negatives=16)
    before = {n: t.memory.memory.clone() for n, t in loss_mod.terms.items()}
    index = torch.tensor([3, 7, 11, 30])
    loss_mod(make_inputs(ctx, index))
    for n, t in loss_mod.terms.items():
        changed = (t.memory.memory != before[n]).any(1)
        assert changed[index].all() and changed.sum() == len(index), n
    sd = loss_mod.state_dict()
    assert int(sd["step"]) == 1
    for n in ctx.teacher_dims:
        assert f"terms.{n}.memory.memory" in sd and f"terms.{n}.z" in sd
        assert (sd[f"terms.{n}.z"] > 0).all()  # set from the first batch
    # Z stays fixed afterwards, and everything round-trips through state_dict
    z0 = sd["terms.t0.z"].clone()
    out = loss_mod(make_inputs(ctx, torch.tensor([1, 2]), seed=5))
    assert torch.equal(loss_mod.terms["t0"].z, z0) and int(loss_mod.step) == 2
    assert float(out.metrics["crd/t0/z_a"]) == float(z0[0]) and float(out.metrics["crd/t0/z_b"]) == float(z0[1])
    fresh = CRDLoss(ctx, feat_dim=8, num_negatives=16)
    fresh.load_state_dict(loss_mod.state_dict())
    assert fresh.terms["t1"].memory.checksum() == loss_mod.terms["t1"].memory.checksum()
    # eval mode: no memory update, no step
    fresh.eval()
    c = fresh.terms["t0"].memory.checksum()
    fresh(make_inputs(ctx, index))
    assert fresh.terms["t0"].memory.checksum() == c and int(fresh.step) == 2


def _expected_crd(loss_mod: CRDLoss, x: DistillInputs, name: str = "t0"):
    """CRD's value of one teacher on the first batch, recomputed in float64 from the formula in
    the expanded (B, N) form (every drawn negative a column, repeats included; no unique/gather
    or counts tricks). It reads only the module's parameters, memory and the sampler's draws.
    Differentiable w.r.t. ``x.student_emb``. Returns (loss, z_a, z_b)."""
    term, sampler = loss_mod.terms[name], loss_mod.samplers[name]
    step, tau, M = int(loss_mod.step), loss_mod.tau, loss_mod.num_rows
    bank = loss_mod.ctx_bank.embeddings[name].double()  # (M, d_t)
    index = x.index
    B = index.shape[0]

    def head(embed, v):  # Embed: Linear, then L2 normalisation
        y = v.double() @ embed.linear.weight.detach().double().t() + embed.linear.bias.detach().double()
        return y / y.norm(dim=-1, keepdim=True)

    neg, valid = sampler.sample(index, step)  # (B, N) | (N,), (B, N)
    neg = neg if neg.dim() == 2 else neg[None, :].expand(B, -1)  # (B, N)
    pos_rows = sampler.sample_positives(index, step) if loss_mod.mode == "relax" else index  # (B,)
    mem = term.memory.memory.double()  # (M, F) before this batch's update
    s = head(term.embed_s, x.student_emb)  # (B, F)
    t = head(term.embed_t, bank[index])  # (B, F)
    # (a) student anchor vs the teacher's positive and negatives; (b) teacher anchor vs student memory
    sides = [(s, head(term.embed_t, bank[pos_rows]), head(term.embed_t, bank[neg])),  # (B, F), (B, N, F)
             (t, mem[pos_rows], mem[neg])]
    total, zs = 0.0, []
    m = valid.sum(1).double()  # (B,) valid negatives per anchor
    for anchor, positive, negatives in sides:
        pos = torch.exp((anchor * positive).sum(-1) / tau)  # (B,)
        negs = torch.exp(torch.einsum("bf,bnf->bn", anchor, negatives) / tau)  # (B, N)
        z = torch.cat([pos[:, None], negs], 1).detach().mean() * M  # Z over every score of the batch
        pn = m / M  # (B,) N_i * Pn
        log_d1 = torch.log((pos / z) / (pos / z + pn + EPS))  # (B,)
        log_d0 = torch.log(pn[:, None] / (negs / z + pn[:, None] + EPS))  # (B, N)
        log_d0 = torch.where(valid, log_d0, torch.zeros_like(log_d0))
        total = total - (log_d1 + log_d0.sum(1)).mean()
        zs.append(z)
    return total, zs[0], zs[1]


def _check_against_expanded(loss_mod: CRDLoss, x: DistillInputs) -> None:
    """Value, gradient w.r.t. the student embedding and Z metrics of the module's first call
    equal the independent expanded computation."""
    s64 = x.student_emb.detach().double().requires_grad_(True)
    want, z_a, z_b = _expected_crd(loss_mod, DistillInputs(s64, x.student_logits, x.labels, x.index))
    want.backward()
    x.student_emb.requires_grad_(True)
    out = loss_mod(x)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-4)
    torch.testing.assert_close(x.student_emb.grad.double(), s64.grad, rtol=1e-3, atol=1e-5)
    assert float(out.metrics["crd/t0/z_a"]) == pytest.approx(z_a.item(), rel=1e-5)
    assert float(out.metrics["crd/t0/z_b"]) == pytest.approx(z_b.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["exact", "relax"])
@pytest.mark.parametrize("negatives,per_sample", [("class-aware", True), ("uniform", False), ("hard", True)])
def test_modes_equal_the_expanded_formula(mode, negatives, per_sample):
    ctx = make_ctx(1)
    loss_mod = build_loss("crd", ctx, feat_dim=8, num_negatives=24, mode=mode, negatives=negatives,
                          per_sample=per_sample, hard_pool=8)
    _check_against_expanded(loss_mod, make_inputs(ctx, torch.tensor([0, 1, 2, 3, 4])))


@pytest.mark.parametrize("negatives,per_sample", [("class-aware", True), ("uniform", False)])
def test_many_negatives_with_replacement(negatives, per_sample):
    """N = 16384 > M = 300: per-sample draws repeat rows within an anchor's (B, N); shared draws
    repeat rows and go through the compact (B, U) + counts form. Both equal the expanded loss."""
    ctx = make_ctx(1, M=300, C=10)
    loss_mod = CRDLoss(ctx, feat_dim=16, num_negatives=16384, mode="exact", negatives=negatives, per_sample=per_sample)
    neg, _ = loss_mod.samplers["t0"].sample(torch.arange(8), 0)
    assert torch.unique(neg.reshape(-1, 16384)[0]).numel() <= 300 < 16384  # one anchor's N draws repeat rows
    _check_against_expanded(loss_mod, make_inputs(ctx, torch.arange(8)))


def test_bad_options():
    ctx = make_ctx(1)
    with pytest.raises(ValueError):
        build_loss("crd", ctx, mode="nope")
    with pytest.raises(ValueError):
        build_loss("crd", ctx, negatives="nope")
    with pytest.raises(ValueError):
        build_loss("crd", ctx, teacher_weights={"ghost": 1.0})
    with pytest.raises(ValueError, match="crd: tau must be > 0"):
        build_loss("crd", ctx, tau=0.0)
    with pytest.raises(ValueError, match="crd: feat_dim"):
        build_loss("crd", ctx, feat_dim=0)


def _epoch_losses(aligned: bool) -> float:
    """Heads set so that head_s(A t) == head_t(t); memory filled over 3 passes; then one pass."""
    torch.manual_seed(0)
    M, d = 120, 8
    g = torch.Generator().manual_seed(1)
    T = torch.randn(M, d, generator=g)
    A = torch.linalg.qr(torch.randn(d, d, generator=g))[0]  # (d, d) orthogonal: s = t @ A
    ctx = make_ctx(1, M=M, C=6, d_s=d, teacher_emb={"t0": T})
    loss_mod = CRDLoss(ctx, feat_dim=8, num_negatives=64, tau=0.1)
    term = loss_mod.terms["t0"]
    with torch.no_grad():  # s W_s^T = t A A^T W_t^T = t W_t^T with W_s = W_t A
        term.embed_s.linear.weight.copy_(term.embed_t.linear.weight @ A)
        term.embed_s.linear.bias.copy_(term.embed_t.linear.bias)
    S = T @ A  # (M, d)
    if not aligned:
        S = S[torch.randperm(M, generator=torch.Generator().manual_seed(2))]
    batches = torch.arange(M).split(20)
    with torch.no_grad():
        for _ in range(3):
            for b in batches:
                loss_mod(make_inputs(ctx, b, student_emb=S[b]))
        return sum(loss_mod(make_inputs(ctx, b, student_emb=S[b])).loss.item() for b in batches) / len(batches)


def test_aligned_pairs_lower_loss_than_shuffled():
    aligned, shuffled = _epoch_losses(True), _epoch_losses(False)
    assert math.isfinite(aligned) and math.isfinite(shuffled)
    assert aligned < shuffled - 1.0, (aligned, shuffled)


def test_distinct_shared_rows_are_the_same_whichever_way_they_are_counted(monkeypatch):
    """The shared draws' distinct rows and counts: a bincount over the M rows (small banks) and a
    sort of the N draws (banks far larger than N) give the same rows, counts and loss."""
    import ensemble_kd.losses.crd as crd_mod

    M = 400
    g = torch.Generator().manual_seed(0)
    ctx = LossContext(student_dim=6, num_classes=4, teacher_dims={"t0": 5},
                      bank=TeacherBank({"t0": torch.randn(M, 5, generator=g)}, {}, torch.arange(M) % 4, torch.arange(M)),
                      seed=0, device=torch.device("cpu"))
    x = DistillInputs(torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g), torch.arange(8) % 4,
                      torch.arange(8), {"t0": torch.randn(8, 5, generator=g)}, {})
    out = {}
    for name, sparse in (("bincount", 10**9), ("sort", 0)):
        monkeypatch.setattr(crd_mod, "SPARSE_DRAW", sparse)
        torch.manual_seed(1)  # the same heads
        loss = CRDLoss(ctx, num_negatives=32, mode="exact", per_sample=False)
        d = loss.draws("t0", x, x.index, 0)
        out[name] = (d.uniq, d.counts, float(loss(x).loss))
    assert torch.equal(out["bincount"][0], out["sort"][0]) and torch.equal(out["bincount"][1], out["sort"][1])
    assert out["bincount"][2] == out["sort"][2]


def test_compact_counts_form_equals_expanded_shared_negatives():
    """Shared negatives with repeats: the (B, U) + counts form gives the (B, N) loss and Z of the
    reference formula written out (``_golden``, every drawn column counted)."""
    g = torch.Generator().manual_seed(3)
    B, U, M = 4, 6, 50
    pos = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    neg_u = torch.rand(B, U, generator=g, dtype=torch.float64) + 0.1
    valid_u = torch.rand(B, U, generator=g) > 0.3
    counts = torch.tensor([3, 1, 4, 1, 5, 2])
    idx = torch.repeat_interleave(torch.arange(U), counts)  # (N,) the expanded draws
    w = torch.rand(B, generator=g, dtype=torch.float64)
    N = int(counts.sum())
    want_z = (sum(pos.tolist()) + sum(v for row in neg_u[:, idx].tolist() for v in row)) / (B * (1 + N)) * M
    z = nce_z(pos, neg_u, M, counts.double())
    assert float(z) == pytest.approx(want_z, rel=1e-12)
    want = _golden(pos.tolist(), neg_u[:, idx].tolist(), M, want_z, valid_u[:, idx].tolist(), w.tolist())
    got = nce_loss(pos, neg_u, M, valid=valid_u, weights=w, z=z, counts=counts.double())
    assert float(got) == pytest.approx(want, rel=1e-9)


# -- the teacher head's gradient (teacher_head_grad) ------------------------------------------
def _expanded_directions(loss_mod: CRDLoss, x: DistillInputs, params: dict[str, torch.Tensor], name: str = "t0"):
    """(loss_a, loss_b) of one teacher on the first batch in float64, in the expanded (B, N) form,
    from the heads' parameters ``params`` (float64 leaves named like ``embed_t.linear.weight``),
    the module's memory and the sampler's draws: the formula, written out without the module."""
    term, sampler = loss_mod.terms[name], loss_mod.samplers[name]
    step, tau, M = int(loss_mod.step), loss_mod.tau, loss_mod.num_rows
    bank = loss_mod.ctx_bank.embeddings[name].double()  # (M, d_t)

    def head(side, v):  # Embed: Linear, then L2 normalisation
        y = v.double() @ params[f"embed_{side}.linear.weight"].t() + params[f"embed_{side}.linear.bias"]
        return y / y.norm(dim=-1, keepdim=True)

    neg, valid = sampler.sample(x.index, step)  # (B, N) per anchor
    pos_rows = sampler.sample_positives(x.index, step) if loss_mod.mode == "relax" else x.index  # (B,)
    mem = term.memory.memory.double()  # (M, F)
    s, t = head("s", x.student_emb), head("t", bank[x.index])  # (B, F)
    out = []
    for anchor, positive, negatives in ((s, head("t", bank[pos_rows]), head("t", bank[neg])),  # (a)
                                        (t, mem[pos_rows], mem[neg])):  # (b)
        pos = torch.exp((anchor * positive).sum(-1) / tau)  # (B,)
        negs = torch.exp(torch.einsum("bf,bnf->bn", anchor, negatives) / tau)  # (B, N)
        z = torch.cat([pos[:, None], negs], 1).detach().mean() * M
        pn = valid.sum(1).double() / M  # (B,) N_i * Pn
        log_d1 = torch.log((pos / z) / (pos / z + pn + EPS))
        log_d0 = torch.where(valid, torch.log(pn[:, None] / (negs / z + pn[:, None] + EPS)), torch.zeros_like(negs))
        out.append(-(log_d1 + log_d0.sum(1)).mean())
    return out[0], out[1]


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_teacher_head_grad_option(mode):
    """teacher_anchor (default, the reference's): the teacher head's gradient is d loss_b only;
    both: d (loss_a + loss_b). The student head's gradient is the same either way."""
    ctx = make_ctx(1)
    x = make_inputs(ctx, torch.tensor([0, 3, 9, 14, 27, 41]))
    assert loss_options("crd")["teacher_head_grad"] == "teacher_anchor"
    grads = {}
    for setting in ("teacher_anchor", "both"):
        torch.manual_seed(0)  # the same heads for both settings
        loss_mod = build_loss("crd", ctx, feat_dim=8, num_negatives=16, mode=mode, teacher_head_grad=setting)
        params = {k: p.detach().double().requires_grad_(True) for k, p in loss_mod.terms["t0"].named_parameters()}
        loss_a, loss_b = _expanded_directions(loss_mod, x, params)
        want = loss_b if setting == "teacher_anchor" else loss_a + loss_b
        want_t = torch.autograd.grad(want, params["embed_t.linear.weight"], retain_graph=True)[0]
        want_s = torch.autograd.grad(loss_a + loss_b, params["embed_s.linear.weight"])[0]
        loss_mod(x).loss.backward()
        got_t, got_s = (loss_mod.terms["t0"].get_submodule(f"embed_{k}").linear.weight.grad for k in "ts")
        torch.testing.assert_close(got_t.double(), want_t, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_s.double(), want_s, rtol=1e-4, atol=1e-6)
        grads[setting] = got_t
    assert (grads["both"] - grads["teacher_anchor"]).abs().max() > 1e-3  # the option matters
    with pytest.raises(ValueError, match="teacher_head_grad must be one of"):
        build_loss("crd", ctx, teacher_head_grad="student")


# -- float32 under autocast ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["crd", "gacd"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_float32_under_bf16_autocast(name, per_sample):
    """Under CPU bf16 autocast the scores, Z and NCE stay float32: the loss is float32 and equals
    the loss computed without autocast; a bf16 student embedding is read as float32."""
    ctx = make_ctx(2)
    x = make_inputs(ctx, torch.tensor([0, 5, 9, 17, 22, 40]))
    torch.manual_seed(0)
    plain = build_loss(name, ctx, feat_dim=8, num_negatives=32, per_sample=per_sample)
    torch.manual_seed(0)
    mixed = build_loss(name, ctx, feat_dim=8, num_negatives=32, per_sample=per_sample)
    want = plain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mixed(x)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    for k, v in want.metrics.items():
        torch.testing.assert_close(got.metrics[k], v, rtol=1e-6, atol=1e-6)
    # a student that ran under autocast hands a bf16 embedding: the loss is that embedding's, in float32
    x16 = make_inputs(ctx, torch.tensor([1, 2, 3]), student_emb=torch.randn(3, ctx.student_dim).bfloat16())
    want16 = plain(DistillInputs(x16.student_emb.float(), x16.student_logits, x16.labels, x16.index,
                                 x16.teacher_emb, x16.teacher_logits))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got16 = mixed(x16)
    assert got16.loss.dtype == torch.float32
    torch.testing.assert_close(got16.loss, want16.loss, rtol=1e-6, atol=1e-6)
