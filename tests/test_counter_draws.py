"""CRD's per-anchor draws on the device (issue 28, item 2): counter-based (a hash of seed, step,
anchor and draw index in int64 arithmetic), for the whole batch at once, no host round trip.

Uniform over the allowed rows (chi-square), never the anchor, class-aware never its class,
distinct whenever N <= the eligible rows, and the same numbers whichever way they are computed:
the hash against an independent NumPy uint64 implementation, a batch against its anchors one at
a time, int32 against int64 anchors, one thread against several, and the meta device (which has
no values: any read of the device in a step fails there)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ensemble_kd.blocks.memory import (NegativeSampler, counter_keys, counter_permutation, counter_uniform, mix64,
                                       mix64_int)
from ensemble_kd.blocks.bank import TeacherBank
from ensemble_kd.losses.base import DistillInputs, LossContext
from ensemble_kd.losses.crd import CRDLoss


def make_ctx(M: int, C: int, d_s: int = 12, d_t: int = 6) -> LossContext:
    g = torch.Generator().manual_seed(0)
    bank = TeacherBank(embeddings={"t0": torch.randn(M, d_t, generator=g)}, logits={"t0": torch.randn(M, C, generator=g)},
                       labels=torch.arange(M) % C, sample_ids=torch.arange(M))
    return LossContext(student_dim=d_s, num_classes=C, teacher_dims={"t0": d_t}, bank=bank, seed=0)


def make_inputs(ctx: LossContext, index: torch.Tensor) -> DistillInputs:
    g = torch.Generator().manual_seed(100)
    B = index.shape[0]
    return DistillInputs(student_emb=torch.randn(B, ctx.student_dim, generator=g),
                         student_logits=torch.randn(B, ctx.num_classes, generator=g), labels=ctx.bank.labels[index],
                         index=index, teacher_emb={"t0": ctx.bank.embeddings["t0"][index]},
                         teacher_logits={"t0": ctx.bank.logits["t0"][index]})


def _mix64_numpy(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser in NumPy's uint64 (wrapping by definition): the reference."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _chi2_pvalue(counts: np.ndarray) -> float:
    """p-value of a chi-square test of equal cell probabilities (scipy if installed, else the
    Wilson-Hilferty normal approximation, good to ~1e-3 at these degrees of freedom)."""
    expected = counts.sum() / counts.size
    stat, k = float(((counts - expected) ** 2 / expected).sum()), counts.size - 1
    try:
        from scipy.stats import chi2
        return float(chi2.sf(stat, k))
    except ImportError:
        z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
        return 0.5 * math.erfc(z / math.sqrt(2))


def test_mix64_is_splitmix64_word_for_word():
    x = torch.randint(-2**63, 2**63 - 1, (10_000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    ref = _mix64_numpy(x.numpy().view(np.uint64)).view(np.int64)
    assert np.array_equal(mix64(x).numpy(), ref)
    assert all(mix64_int(int(v)) == int(r) for v, r in zip(x[:50], ref[:50]))
    assert mix64_int(0) == 0


def test_the_same_draws_whichever_way_they_are_computed():
    labels = torch.arange(500) % 7
    anchors = torch.randperm(500, generator=torch.Generator().manual_seed(2))[:32]
    for mode, n in (("uniform", 300), ("uniform", 2000), ("class-aware", 200), ("class-aware", 5000)):
        s = NegativeSampler(None, labels, mode=mode, num_negatives=n, per_sample=True, seed=11)
        neg, _ = s.sample(anchors, step=9)
        one_by_one = torch.cat([s.sample(anchors[i:i + 1], step=9)[0] for i in range(len(anchors))])
        assert torch.equal(neg, one_by_one), mode  # a counter per (anchor, draw): no state, no order
        assert torch.equal(neg, s.sample(anchors.to(torch.int32), step=9)[0]), mode
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(neg, s.sample(anchors, step=9)[0]), mode  # no parallel split changes a bit
        finally:
            torch.set_num_threads(threads)
        again = NegativeSampler(None, labels, mode=mode, num_negatives=n, per_sample=True, seed=11)
        assert torch.equal(neg, again.sample(anchors, step=9)[0])
        assert not torch.equal(neg, s.sample(anchors, step=10)[0])


def test_counter_uniform_matches_an_independent_numpy_draw():
    keys = torch.tensor([5, -7, 2**62 + 3])
    bound = torch.tensor([3, 1999, 49_500])
    got = counter_uniform(keys, 7, bound)  # (3, 7)
    j = (np.arange(1, 5, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        h = _mix64_numpy(keys.numpy().view(np.uint64)[:, None] + j[None, :])  # (3, 4) hashes
    halves = h.view(np.uint32)[:, :7].astype(np.uint64)  # each hash's low then high 32 bits (little-endian)
    u = halves ^ np.uint64(1 << 31)  # the signed view shifted by 2^31: the top bit flipped
    ref = (u * bound.numpy().astype(np.uint64)[:, None]) >> np.uint64(32)
    assert np.array_equal(got.numpy(), ref.astype(np.int64))


def test_no_host_round_trip_in_a_step():
    """The meta device has shapes and no values: a draw that read the device (an .item(), a copy to
    the host, a data-dependent shape) would fail here."""
    labels = torch.arange(300) % 5
    anchors = torch.arange(16).to("meta")
    for mode, n in (("uniform", 100), ("class-aware", 1000), ("class-aware", 100)):
        s = NegativeSampler(None, labels, mode=mode, num_negatives=n, per_sample=True, seed=0)
        neg, valid = s.sample(anchors, step=3)
        assert neg.device.type == "meta" and neg.shape == (16, n) and valid.shape == (16, n)
    assert s.sample_positives(anchors, step=3).device.type == "meta"
    ctx = make_ctx(M=40, C=4)
    loss = CRDLoss(ctx, feat_dim=8, num_negatives=16, mode="exact", per_sample=True)
    assert loss.bank_rows("t0", torch.arange(5).to("meta")).shape == (5, ctx.teacher_dims["t0"])  # gathered there


def test_a_permutation_of_the_whole_range_is_a_bijection():
    keys = counter_keys(3, 1, 1, torch.arange(6))
    bound = torch.tensor([1, 2, 7, 64, 1000, 4097])
    for b in range(6):
        e = int(bound[b])
        perm = counter_permutation(keys[b: b + 1], e, bound[b: b + 1])[0]
        assert sorted(perm.tolist()) == list(range(e))


@pytest.mark.parametrize("mode,N", [("uniform", 40), ("uniform", 400), ("class-aware", 30), ("class-aware", 300)])
def test_draws_are_uniform_over_the_allowed_rows(mode, N):
    """M = 120 rows of 4 classes (30 each): uniform anchors may draw 119 rows, class-aware ones 90.
    N below that: distinct draws (a keyed permutation); above: with replacement. Either way each
    allowed row is equally likely (pooled over anchors and steps, by the row's position among the
    anchor's allowed rows), never the anchor, class-aware never its class."""
    M, C = 120, 4
    labels = torch.arange(M) % C
    s = NegativeSampler(None, labels, mode=mode, num_negatives=N, per_sample=True, seed=5)
    anchors = torch.arange(M)
    e = M - 1 if mode == "uniform" else M - M // C
    hist = np.zeros(e, dtype=np.int64)
    for step in range(60 if N < 100 else 8):
        neg, valid = s.sample(anchors, step)  # (M, N)
        assert valid.all() and (neg != anchors[:, None]).all() and ((neg >= 0) & (neg < M)).all()
        if mode == "class-aware":
            assert (labels[neg] != labels[anchors][:, None]).all()
        if N <= e:
            assert all(len(set(r)) == N for r in neg.tolist())  # no row twice for one anchor
        # the row's rank among the anchor's allowed rows (0..e-1), the same for every anchor
        if mode == "uniform":
            rank = neg - (neg > anchors[:, None]).long()
        else:
            others = torch.stack([torch.nonzero(labels != labels[a]).flatten() for a in anchors])  # (M, e) sorted
            rank = torch.searchsorted(others, neg)
        hist += np.bincount(rank.reshape(-1).numpy(), minlength=e)
    assert _chi2_pvalue(hist) > 1e-4, hist


def test_the_permutation_is_not_a_block():
    """Without replacement the N rows are spread over the eligible range, not a rotated block:
    their gaps look like a random subset's (no gap of 1 for every draw, none huge)."""
    keys = counter_keys(0, 0, 1, torch.arange(64))
    bound = torch.full((64,), 10_000)
    x = counter_permutation(keys, 500, bound).sort(dim=1).values  # (64, 500)
    gaps = x.diff(dim=1).float()
    assert 15 < gaps.mean() < 25 and (gaps == 1).float().mean() < 0.2 and gaps.max() < 400


def test_per_sample_crd_equals_the_expanded_loss_with_counts():
    """Per-anchor draws that reach every row are scored once per row and weighted by how often each
    anchor drew it: the loss of the (B, N) draws, computed over (B, M)."""
    from ensemble_kd.losses.functional import crd_scores, nce_loss

    ctx = make_ctx(M=50, C=5)
    loss = CRDLoss(ctx, feat_dim=8, num_negatives=200, mode="exact", per_sample=True, negatives="class-aware")
    loss.eval()
    idx = torch.arange(10)
    x = make_inputs(ctx, idx)
    got = loss(x).loss
    term = loss.terms[loss._key["t0"]]
    neg, _ = loss.samplers["t0"].sample(idx, 0)  # (B, N) the very draws
    s = term.embed_s(x.student_emb)
    t = term.embed_t(x.teacher_emb["t0"])
    t_neg = term.embed_t(ctx.bank.embeddings["t0"])[neg].detach()  # (B, N, F)
    s_neg = term.memory.memory[neg]
    total = 0
    for which, (anchor, pos, negs) in enumerate(((s, t.detach(), t_neg), (t, term.memory.memory[idx], s_neg))):
        p, n = crd_scores(anchor, pos, negs, loss.tau)
        total = total + nce_loss(p, n, 50, z=term.z[which])
    assert torch.allclose(got, total, rtol=1e-5), (got, total)


def test_relax_positives_on_the_device_are_of_the_anchors_class():
    labels = torch.arange(90) % 3
    s = NegativeSampler(None, labels, mode="class-aware", num_negatives=5, seed=1)
    a = torch.arange(90)
    hits = np.zeros(90, dtype=np.int64)
    for step in range(40):
        p = s.sample_positives(a, step)
        assert (labels[p] == labels[a]).all() and (p != a).all()
        hits += np.bincount(p.numpy(), minlength=90)
    assert _chi2_pvalue(hits) > 1e-4
