"""NegativeSampler (uniform / class-aware / hard with real FAISS) and MomentumMemory, including a
real 2-process gloo run that checks the memory stays identical on every worker."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble_kd.core import dist
from ensemble_kd.blocks.memory import MomentumMemory, NegativeSampler
from tests.helpers import spawn_processes

M, D, C = 120, 8, 4


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(M, D, generator=g)
    labels = torch.arange(M) % C
    labels = labels[torch.randperm(M, generator=g)]
    return emb, labels


def anchors_of(n=10, seed=1):
    return torch.randperm(M, generator=torch.Generator().manual_seed(seed))[:n]


def test_class_aware_per_sample_never_anchor_class(data):
    emb, labels = data
    s = NegativeSampler(emb, labels, mode="class-aware", num_negatives=50, per_sample=True, seed=3)
    a = anchors_of()
    neg, valid = s.sample(a, step=0)
    assert neg.shape == (10, 50) and neg.dtype == torch.int64 and valid.shape == (10, 50)
    assert (labels[neg] != labels[a][:, None]).all()
    assert valid.all()
    assert ((neg >= 0) & (neg < M)).all()
    # 50 <= 90 eligible: drawn without replacement
    assert all(len(set(r.tolist())) == 50 for r in neg)


def test_uniform_never_anchor(data):
    emb, labels = data
    s = NegativeSampler(emb, labels, mode="uniform", num_negatives=200, per_sample=True, seed=3)
    a = anchors_of()
    neg, valid = s.sample(a, step=5)
    assert neg.shape == (10, 200)  # 200 > 119 eligible: with replacement
    assert (neg != a[:, None]).all() and valid.all()
    assert torch.equal(valid, neg != a[:, None])
    # every other row is reachable (uniform over M-1 rows)
    big = NegativeSampler(emb, labels, mode="uniform", num_negatives=4000, per_sample=True, seed=3)
    n0, _ = big.sample(torch.tensor([7]), step=0)
    assert set(n0[0].tolist()) == set(range(M)) - {7}


def _brute_force_pool(emb, labels, P):
    x = emb.numpy().astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    lab = labels.numpy()
    sim[lab[:, None] == lab[None, :]] = -np.inf  # other classes only (and never itself)
    return np.argsort(-sim, axis=1, kind="stable")[:, :P]


def test_hard_negatives_are_true_knn_of_other_classes(data):
    emb, labels = data
    P = 10
    s = NegativeSampler(emb, labels, mode="hard", num_negatives=30, per_sample=True, seed=3, hard_pool=P)
    ref = _brute_force_pool(emb, labels, P)
    assert s.hard_pool.shape == (M, P) and (s.hard_len == P).all()
    for r in range(M):
        assert set(s.hard_pool[r].tolist()) == set(ref[r].tolist()), r
    a = anchors_of()
    neg, valid = s.sample(a, step=2)
    assert neg.shape == (10, 30) and valid.all()  # 30 > 10 pool: with replacement
    for i, ai in enumerate(a.tolist()):
        assert set(neg[i].tolist()) <= set(ref[ai].tolist())
        assert labels[ai] not in labels[neg[i]].tolist()


def test_shared_mode_shape_and_mask(data):
    emb, labels = data
    a = anchors_of()
    for mode in ("uniform", "class-aware", "hard"):
        s = NegativeSampler(emb, labels, mode=mode, num_negatives=40, per_sample=False, seed=3, hard_pool=8)
        neg, valid = s.sample(a, step=1)
        assert neg.shape == (40,) and valid.shape == (10, 40)
        expect = neg[None, :] != a[:, None]
        if mode != "uniform":
            expect &= labels[neg][None, :] != labels[a][:, None]
        assert torch.equal(valid, expect), mode
        assert len(set(neg.tolist())) == 40  # N <= candidates: without replacement
        if mode == "hard":
            union = set(s.hard_pool[a].reshape(-1).tolist())
            assert set(neg.tolist()) <= union
    # N larger than the rows: with replacement
    s = NegativeSampler(emb, labels, mode="class-aware", num_negatives=1000, per_sample=False, seed=3)
    neg, valid = s.sample(a, step=1)
    assert neg.shape == (1000,) and valid.shape == (10, 1000)


def test_determinism(data):
    emb, labels = data
    a = anchors_of()
    for mode in ("uniform", "class-aware", "hard"):
        for per_sample in (True, False):
            kw = dict(mode=mode, num_negatives=20, per_sample=per_sample, hard_pool=8)
            s1 = NegativeSampler(emb, labels, seed=11, **kw)
            s2 = NegativeSampler(emb, labels, seed=11, **kw)
            n1, v1 = s1.sample(a, step=4)
            n2, v2 = s2.sample(a, step=4)
            assert torch.equal(n1, n2) and torch.equal(v1, v2)
            n3, _ = s1.sample(a, step=5)
            assert not torch.equal(n1, n3), (mode, per_sample)
            n4, _ = NegativeSampler(emb, labels, seed=12, **kw).sample(a, step=4)
            assert not torch.equal(n1, n4), (mode, per_sample)


def test_n_exceeds_eligible(data):
    emb, labels = data
    s = NegativeSampler(emb, labels, mode="class-aware", num_negatives=16384, per_sample=True, seed=0)
    a = anchors_of(4)
    neg, valid = s.sample(a, step=0)
    assert neg.shape == (4, 16384) and valid.all()
    assert (labels[neg] != labels[a][:, None]).all()
    # the draws cover every eligible row (uniform over the 90 other-class rows)
    assert set(neg[0].tolist()) == set(torch.nonzero(labels != labels[a[0]]).flatten().tolist())


def _max_repeats(neg: torch.Tensor, num_rows: int) -> int:
    """Most times one row appears in one anchor's draws (B, N): 1 = no repeats within a row."""
    key = neg + torch.arange(neg.shape[0])[:, None] * num_rows  # (B, N) unique per (anchor, row)
    return int(torch.bincount(key.reshape(-1), minlength=neg.shape[0] * num_rows).max())


@pytest.mark.parametrize("mode,B", [("class-aware", 64), ("uniform", 64), ("class-aware", 128)])
def test_no_repeats_within_an_anchor_at_cifar100_scale(mode, B):
    """M = 50,000 rows of 100 classes, N = 16,384, B = 64 (and 128, where draws used to repeat
    14.8% of rows: B * eligible passed 4M): no row twice in one anchor's negatives, the
    class-aware rule holds, and the draws are a function of (seed, step) only."""
    Mc, N = 50_000, 16_384
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(Mc) % 100)[torch.randperm(Mc, generator=g)]  # (M,)
    anchors = torch.randperm(Mc, generator=g)[:B]  # (B,)
    s = NegativeSampler(None, labels, mode=mode, num_negatives=N, per_sample=True, seed=7)
    neg, valid = s.sample(anchors, step=3)
    assert neg.shape == (B, N) and valid.all()
    assert _max_repeats(neg, Mc) == 1
    assert (neg != anchors[:, None]).all() and ((neg >= 0) & (neg < Mc)).all()
    if mode == "class-aware":
        assert (labels[neg] != labels[anchors][:, None]).all()
    again, _ = NegativeSampler(None, labels, mode=mode, num_negatives=N, per_sample=True, seed=7).sample(anchors, 3)
    assert torch.equal(neg, again)
    assert not torch.equal(neg, s.sample(anchors, step=4)[0])


def test_per_anchor_replacement_only_where_too_few_rows():
    """Classes of 300 and 20 rows, N = 200: anchors of the small class have 300 eligible rows and
    draw them without replacement; anchors of the big class have 20 and must repeat them."""
    labels = torch.cat([torch.zeros(300, dtype=torch.int64), torch.ones(20, dtype=torch.int64)])  # (320,)
    s = NegativeSampler(None, labels, mode="class-aware", num_negatives=200, per_sample=True, seed=0)
    anchors = torch.tensor([3, 305, 150, 319])  # big, small, big, small class
    neg, valid = s.sample(anchors, step=0)
    assert valid.all() and (labels[neg] != labels[anchors][:, None]).all()
    for i in (1, 3):
        assert len(set(neg[i].tolist())) == 200  # 200 of the 300 big-class rows, distinct
    for i in (0, 2):
        assert set(neg[i].tolist()) == set(range(300, 320))  # all 20 small-class rows, repeated


def test_relax_positives_same_class(data):
    emb, labels = data
    s = NegativeSampler(emb, labels, mode="class-aware", num_negatives=5, seed=0)
    a = anchors_of(20)
    p = s.sample_positives(a, step=0)
    assert (labels[p] == labels[a]).all() and (p != a).all()
    assert torch.equal(p, s.sample_positives(a, step=0))


def test_memory_init_and_update_formula():
    mem = MomentumMemory(10, 4, momentum=0.5, seed=7)
    assert torch.allclose(mem.memory.norm(dim=1), torch.ones(10), atol=1e-6)
    again = MomentumMemory(10, 4, momentum=0.5, seed=7)
    assert mem.checksum() == again.checksum()
    assert mem.checksum() != MomentumMemory(10, 4, seed=8).checksum()
    before = mem.memory.clone()
    idx = torch.tensor([2, 5])
    vals = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    c0 = mem.checksum()
    mem.update(idx, vals)
    assert mem.checksum() != c0
    for k, r in enumerate([2, 5]):
        v = [0.5 * before[r, j].item() + 0.5 * vals[k, j].item() for j in range(4)]
        n = sum(e * e for e in v) ** 0.5
        assert torch.allclose(mem.memory[r], torch.tensor([e / n for e in v]), atol=1e-6)
    untouched = [r for r in range(10) if r not in (2, 5)]
    assert torch.equal(mem.memory[untouched], before[untouched])
    assert torch.equal(mem.gather(torch.tensor([[2, 5]])), mem.memory[[2, 5]][None])
    assert "memory" in mem.state_dict()


def test_memory_duplicates_last_wins():
    mem = MomentumMemory(6, 3, momentum=0.5, seed=1)
    before = mem.memory.clone()
    idx = torch.tensor([1, 4, 1])
    vals = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    mem.update(idx, vals)
    assert torch.allclose(mem.memory[1], F.normalize(0.5 * before[1] + 0.5 * vals[2], dim=0))
    assert torch.allclose(mem.memory[4], F.normalize(0.5 * before[4] + 0.5 * vals[1], dim=0))


def test_dist_noops_single_process():
    t = torch.arange(6).reshape(3, 2)
    assert dist.world_size() == 1 and dist.rank() == 0
    assert dist.all_gather_cat(t) is t
    assert torch.equal(dist.all_reduce_mean(t.float()), t.float())
    assert dist.broadcast(t) is t


# -- a real 2-process gloo run ---------------------------------------------------------------
WS, STEPS, MROWS, MDIM = 2, 3, 40, 6


def _local_batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    n = 5 + rank  # different sizes per rank (exercises the padded all-gather)
    idx = torch.randint(0, MROWS, (n,), generator=g)  # duplicates within and across ranks likely
    return idx, torch.randn(n, MDIM, generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WS)
    try:
        assert dist.world_size() == WS and dist.rank() == rank
        mem = MomentumMemory(MROWS, MDIM, momentum=0.5, seed=3)
        for step in range(STEPS):
            mem.update(*_local_batch(rank, step))
        z = dist.all_reduce_mean(torch.tensor([float(rank)]))
        b = dist.broadcast(torch.tensor([rank + 10]), src=1)
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(f"{mem.checksum()}\n{z.item()}\n{b.item()}\n")
    finally:
        tdist.destroy_process_group()


def test_two_process_memory_consistency(tmp_path):
    spawn_processes(_worker, (str(tmp_path / "pg_init"), str(tmp_path)), WS, timeout_s=120)
    lines = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(WS)]
    sums = [ln[0] for ln in lines]
    assert sums[0] == sums[1]
    assert all(float(ln[1]) == 0.5 for ln in lines)  # mean of ranks 0, 1
    assert all(int(ln[2]) == 11 for ln in lines)  # rank 1's value
    ref = MomentumMemory(MROWS, MDIM, momentum=0.5, seed=3)
    for step in range(STEPS):
        parts = [_local_batch(r, step) for r in range(WS)]
        ref.update(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    assert ref.checksum() == sums[0]


def test_shared_draws_from_a_bank_far_larger_than_n_are_distinct_and_deterministic():
    """M > SPARSE_DRAW x N: the N shared negatives come from an O(N) draw (no permutation of every
    row): distinct, in range, the same for the same (seed, step), different across steps and
    spread over the whole bank."""
    from ensemble_kd.blocks.memory import SPARSE_DRAW

    Mb, N = 70_000, 64
    assert Mb > SPARSE_DRAW * N
    labels = torch.arange(Mb) % 10
    s = NegativeSampler(None, labels, mode="uniform", num_negatives=N, per_sample=False, seed=5)
    a = torch.arange(8)
    neg, valid = s.sample(a, step=3)
    assert neg.shape == (N,) and len(set(neg.tolist())) == N and ((neg >= 0) & (neg < Mb)).all()
    assert torch.equal(valid, neg[None, :] != a[:, None])
    assert torch.equal(neg, s.sample(a, step=3)[0]) and not torch.equal(neg, s.sample(a, step=4)[0])
    many = torch.cat([s.sample(a, step=k)[0] for k in range(50)])  # 3,200 draws
    assert int(many.max()) > 0.9 * Mb and int(many.min()) < 0.1 * Mb


def test_the_shared_negatives_mask_is_built_on_the_draws_device(data):
    """On a GPU the shared draws live on the device while the labels start on the host: the mask
    must be built there (found on an H200: indexing the host labels with device rows raised). The
    meta device stands in for the GPU here: it carries the device through without a GPU."""
    emb, labels = data
    s = NegativeSampler(emb, labels, mode="class-aware", num_negatives=40, per_sample=False, seed=3)
    neg, _ = s.sample(anchors_of(), step=1, with_valid=False)
    valid = s.valid_mask(anchors_of().to("meta"), neg.to("meta"))
    assert valid.device.type == "meta" and valid.shape == (10, 40)
    assert s.labels_on(torch.device("meta")) is s.labels_on(torch.device("meta"))  # copied once
