"""CRD's `reference` mode against RepDistiller's CRDLoss (tests/fixtures/repdistiller/crd.pt: three
steps of the reference run in float64 on CPU), and what the mode needs and refuses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torch.nn.functional as F

from ensemble_kd.losses import functional as fn
from ensemble_kd.losses.base import DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses.crd import CRDLoss
from tests.helpers import spawn_processes

FIXTURE = Path(__file__).parent / "fixtures" / "repdistiller" / "crd.pt"
TOL = 1e-6


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, weights_only=True)


def _bare_ctx(M: int, s_dim: int, t_dims: dict[str, int], C: int = 10) -> LossContext:
    """A context whose bank holds labels and sample ids only, as the online data path's: no
    precomputed teacher embeddings (nor logits)."""
    bank = TeacherBank(embeddings={}, logits={}, labels=torch.arange(M) % C, sample_ids=torch.arange(M))
    return LossContext(student_dim=s_dim, num_classes=C, teacher_dims=t_dims, bank=bank, seed=0)


def _reference_loss(ref) -> CRDLoss:
    cfg = ref["config"]
    ctx = _bare_ctx(cfg["n_data"], cfg["s_dim"], {"t0": cfg["t_dim"]})
    loss = build_loss("crd", ctx, mode="reference", feat_dim=cfg["feat_dim"], num_negatives=cfg["nce_k"],
                      tau=cfg["nce_t"], momentum=cfg["nce_m"]).double()
    term, init = loss.terms["t0"], ref["init"]
    with torch.no_grad():
        for side in ("s", "t"):
            embed = getattr(term, f"embed_{side}").linear
            embed.weight.copy_(init[f"embed_{side}.weight"])
            embed.bias.copy_(init[f"embed_{side}.bias"])
        term.memory.memory.copy_(init["memory_v1"])  # v1: the student side
        term.memory_t.memory.copy_(init["memory_v2"])  # v2: the teacher side
    return loss


def _max_diffs(loss: CRDLoss, step: dict) -> dict[str, float]:
    """One training step of ``loss`` on the fixture's step: max abs difference of each output."""
    f_s = step["f_s"].clone().requires_grad_(True)  # (B, s_dim)
    f_t = step["f_t"].clone().requires_grad_(True)  # (B, t_dim)
    idx = step["idx"]
    x = DistillInputs(student_emb=f_s, student_logits=torch.zeros(idx.shape[0], 10), labels=idx % 10, index=idx,
                      teacher_emb={"t0": f_t}, contrast_idx=step["contrast_idx"])
    out = loss(x)
    out.loss.backward()
    term = loss.terms["t0"]
    got = {"loss": out.loss.detach(), "grad_f_s": f_s.grad, "grad_f_t": f_t.grad,
           "Z_v1": out.metrics["crd/t0/z_a"], "Z_v2": out.metrics["crd/t0/z_b"],
           "memory_v1_after": term.memory.memory, "memory_v2_after": term.memory_t.memory}
    assert out.loss.dtype == torch.float64
    return {k: float((v.double() - torch.as_tensor(step[k], dtype=torch.float64)).abs().max()) for k, v in got.items()}


def test_reference_mode_replays_repdistiller_crd(ref):
    """Loss, d loss / d f_s, d loss / d f_t, both Z and both memories after each of the three
    steps equal the reference to 1e-6 (heads not stepped between steps, as in the fixture)."""
    assert ref["config"]["n_data"] == 200 and len(ref["steps"]) == 3
    loss = _reference_loss(ref)
    worst: dict[str, float] = {}
    for i, step in enumerate(ref["steps"]):
        diffs = _max_diffs(loss, step)
        bad = {k: v for k, v in diffs.items() if not v <= TOL}
        assert not bad, f"step {i}: {bad}"
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in diffs.items()}
    print("max abs differences against crd.pt over 3 steps:", {k: f"{v:.2e}" for k, v in worst.items()})
    assert int(loss.step) == 3


def test_functional_pieces_replay_repdistiller_crd(ref):
    """The public pure functions alone (heads written out as Linear + L2 normalisation): scores,
    Z from the first step, the NCE loss of both directions and the momentum update of both
    memories replay the fixture's three steps, gradients w.r.t. f_s and f_t included, to 1e-6."""
    cfg, init = ref["config"], ref["init"]
    M, tau = cfg["n_data"], cfg["nce_t"]
    mem_s, mem_t = init["memory_v1"].clone(), init["memory_v2"].clone()  # (M, F) student, teacher side
    z: list[torch.Tensor | None] = [None, None]
    for i, step in enumerate(ref["steps"]):
        f_s = step["f_s"].clone().requires_grad_(True)  # (B, s_dim)
        f_t = step["f_t"].clone().requires_grad_(True)  # (B, t_dim)
        s = F.normalize(f_s @ init["embed_s.weight"].t() + init["embed_s.bias"], dim=1)  # (B, F)
        t = F.normalize(f_t @ init["embed_t.weight"].t() + init["embed_t.bias"], dim=1)  # (B, F)
        pos_rows, neg_rows = step["contrast_idx"][:, 0], step["contrast_idx"][:, 1:]  # (B,), (B, N)
        loss = torch.zeros((), dtype=torch.float64)
        # out_v1: the student anchor against the teacher memory; out_v2: the teacher anchor against the student's
        for which, (anchor, mem) in enumerate(((s, mem_t), (t, mem_s))):
            pos, neg = fn.crd_scores(anchor, mem[pos_rows], mem[neg_rows], tau)  # (B,), (B, N)
            if z[which] is None:
                z[which] = fn.nce_z(pos, neg, M)
            loss = loss + fn.nce_loss(pos, neg, M, z=z[which])
        loss.backward()
        idx = step["idx"]
        mem_s[idx] = fn.memory_update(mem_s[idx], s.detach(), cfg["nce_m"])
        mem_t[idx] = fn.memory_update(mem_t[idx], t.detach(), cfg["nce_m"])
        got = {"loss": loss.detach(), "grad_f_s": f_s.grad, "grad_f_t": f_t.grad, "Z_v1": z[0], "Z_v2": z[1],
               "memory_v1_after": mem_s, "memory_v2_after": mem_t}
        diffs = {k: float((v - torch.as_tensor(step[k], dtype=torch.float64)).abs().max()) for k, v in got.items()}
        assert all(v <= TOL for v in diffs.values()), f"step {i}: {diffs}"


def test_reference_mode_draws_uniformly_without_bank_embeddings():
    """No contrast_idx: negatives drawn uniformly (the reference's draw), one term per teacher,
    both memories move at the batch rows only, every head gets a gradient."""
    ctx = _bare_ctx(40, 6, {"ta": 5, "tb": 3})
    loss = build_loss("crd", ctx, mode="reference", feat_dim=4, num_negatives=8)
    assert all(s.mode == "uniform" for s in loss.samplers.values())
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([1, 7, 22, 39])
    x = DistillInputs(torch.randn(4, 6, generator=g).requires_grad_(True), torch.zeros(4, 10), index % 10, index,
                      teacher_emb={"ta": torch.randn(4, 5, generator=g), "tb": torch.randn(4, 3, generator=g)})
    before = {n: (t.memory.memory.clone(), t.memory_t.memory.clone()) for n, t in loss.terms.items()}
    out = loss(x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(loss.terms) == {"ta", "tb"}
    for n, term in loss.terms.items():
        for mem, old in zip((term.memory, term.memory_t), before[n]):
            changed = (mem.memory != old).any(1)
            assert changed[index].all() and int(changed.sum()) == 4, n
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters()), n
    assert "terms.ta.memory_t.memory" in loss.state_dict()
    # the teacher memory is what (a) reads: a zero student memory leaves loss_a unchanged
    loss.eval()
    z_before = {n: t.z.clone() for n, t in loss.terms.items()}
    a1 = loss(x).metrics["crd/ta/loss_a"]
    loss.terms["ta"].memory.memory.zero_()
    assert torch.equal(loss(x).metrics["crd/ta/loss_a"], a1)
    assert all(torch.equal(t.z, z_before[n]) for n, t in loss.terms.items())


def test_reference_mode_refusals():
    ctx = _bare_ctx(30, 4, {"t0": 3})
    with pytest.raises(ValueError, match="teacher_head_grad 'both' needs mode exact or relax"):
        build_loss("crd", ctx, mode="reference", teacher_head_grad="both")
    for mode in ("exact", "relax"):  # these project the bank's embeddings: refused without them
        with pytest.raises(ValueError, match="teacher bank has no embeddings"):
            build_loss("crd", ctx, mode=mode)
    with pytest.raises(ValueError, match="teacher bank has no embeddings"):
        build_loss("crd", ctx, mode="reference", negatives="hard")
    loss = build_loss("crd", ctx, mode="reference", feat_dim=4, num_negatives=5)
    index = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="no embedding of teacher 't0'"):
        loss(DistillInputs(torch.randn(2, 4), torch.zeros(2, 10), index % 10, index))
    with pytest.raises(ValueError, match=r"contrast_idx must be \(B, 1\+N\)"):
        loss(DistillInputs(torch.randn(2, 4), torch.zeros(2, 10), index % 10, index, {"t0": torch.randn(2, 3)},
                           contrast_idx=torch.zeros(2, 3, dtype=torch.int64)))


def test_gacd_in_reference_mode():
    """GACD keeps working in reference mode: its weights multiply both directions' anchors, so with
    certain teachers and its own positives it is CRD (whose reference mode replays crd.pt above)."""
    ctx = _bare_ctx(30, 4, {"t0": 3}, C=3)
    index = torch.tensor([0, 4, 8])
    g = torch.Generator().manual_seed(1)
    sure = 50.0 * torch.nn.functional.one_hot(index % 3, 3).float()  # p(y|x) = 1: GACD = CRD
    x = DistillInputs(torch.randn(3, 4, generator=g), torch.zeros(3, 3), index % 3, index,
                      {"t0": torch.randn(3, 3, generator=g)}, {"t0": sure})
    kw = {"mode": "reference", "feat_dim": 4, "num_negatives": 6, "negatives": "uniform", "tau": 0.1}
    torch.manual_seed(0)
    gacd = build_loss("gacd", ctx, positives="own", **kw)  # CRD's own positives (GACD's default is relaxed)
    torch.manual_seed(0)
    crd = build_loss("crd", ctx, **kw)
    torch.testing.assert_close(gacd(x).loss, crd(x).loss)


# -- two gloo workers: both memories and Z identical, and equal to one worker on the whole batch --
WS, HALF, STEPS, M2 = 2, 4, 2, 30


def _ws_batch(step: int, rows: slice) -> DistillInputs:
    """Global batch ``step`` (2 * HALF rows, distinct), restricted to ``rows``; contrast_idx given."""
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randperm(M2, generator=g)[:WS * HALF]  # (2H,)
    ci = torch.cat([idx[:, None], torch.randint(0, M2, (WS * HALF, 5), generator=g)], 1)  # (2H, 1+5)
    f_s, f_t = torch.randn(WS * HALF, 4, generator=g), torch.randn(WS * HALF, 3, generator=g)
    return DistillInputs(f_s[rows], torch.zeros(WS * HALF, 10)[rows], (idx % 10)[rows], idx[rows],
                         {"t0": f_t[rows]}, contrast_idx=ci[rows])


def _ws_run(rows_of_step) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # same heads on every worker, as the loop's seeding
    loss = build_loss("crd", _bare_ctx(M2, 4, {"t0": 3}), mode="reference", feat_dim=4, num_negatives=5)
    for step in range(STEPS):
        loss(_ws_batch(step, rows_of_step(step)))
    term = loss.terms["t0"]
    return {"memory": term.memory.memory.clone(), "memory_t": term.memory_t.memory.clone(), "z": term.z.clone()}


def _ws_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WS)
    try:
        torch.save(_ws_run(lambda step: slice(rank * HALF, (rank + 1) * HALF)), f"{out_dir}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_two_workers_keep_both_memories_identical(tmp_path):
    spawn_processes(_ws_worker, (str(tmp_path / "pg_init"), str(tmp_path)), WS, timeout_s=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WS)]
    for k in ("memory", "memory_t", "z"):
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    whole = _ws_run(lambda step: slice(0, WS * HALF))  # one worker, the concatenated batch
    for k in ("memory", "memory_t"):
        torch.testing.assert_close(ranks[0][k], whole[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(ranks[0]["z"], whole["z"], rtol=1e-5, atol=0)  # equal halves: mean of Zs = Z
