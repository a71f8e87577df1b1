"""GACD (Bai et al., 2020, arXiv:2009.09922): confidence-weighted CRD, PGD views stored at embed
time and replayed exactly, the shard id of the adversarial recipe, and a short distillation."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble_kd.blocks.adversarial import pgd_perturb, row_generators
from ensemble_kd.core.config import AdversarialConfig, ConfigError, EmbedConfig, ViewsConfig, to_dict
from ensemble_kd.training.data import DistillData
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses.crd import CRDLoss, nce_loss
from ensemble_kd.losses.gacd import GACDLoss, teacher_confidence
from ensemble_kd.core.rows import full
from ensemble_kd.storage.shards import Shard, ShardKey, ShardSet
from ensemble_kd.stages.embed import plan_shards, shard_key, write_shard
from ensemble_kd.storage.teacher_checkpoint import load_teacher
from ensemble_kd.blocks.views import apply_view, draw_views, view_recipe
from modalities import build_dataset
from tests.helpers import embed, run_distill, teacher_set, tiny_config

EPS = 1e-7  # as nce_loss


def _softmax_at(logits_row, y, T=1.0):
    e = [math.exp(v / T) for v in logits_row]
    return e[y] / sum(e)


# -- the loss ------------------------------------------------------------------------------

def test_golden_nce_with_confidence_weights():
    """The nce_loss docstring formula, written out with w_i = softmax(teacher logits)[y_i]."""
    pos = [2.0, 0.5, 1.5]
    neg = [[0.3, 1.2], [2.5, 0.1], [0.7, 0.7]]
    logits = [[2.0, 0.0, -1.0], [0.0, 0.5, 3.0], [1.0, 1.0, 1.0]]
    labels = [0, 0, 2]
    M, z = 20, 1.7
    w = [_softmax_at(logits[i], labels[i]) for i in range(3)]
    expected = 0.0
    for i in range(3):
        n, pn = len(neg[i]), 1.0 / M
        term = math.log((pos[i] / z) / (pos[i] / z + n * pn + EPS))
        term += sum(math.log(n * pn / (s / z + n * pn + EPS)) for s in neg[i])
        expected += w[i] * term
    expected = -expected / 3
    wt = teacher_confidence(torch.tensor(logits), torch.tensor(labels))
    got = nce_loss(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64), M, weights=wt, z=z)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    unweighted = nce_loss(torch.tensor(pos), torch.tensor(neg), M, z=z)
    assert abs(unweighted.item() - got.item()) > 0.1  # the weights matter here


def _tiny_ctx(seed=0):
    g = torch.Generator().manual_seed(seed)
    M, C = 12, 3
    labels = torch.arange(M) % C  # (M,)
    emb = {"ta": torch.randn(M, 6, generator=g), "tb": torch.randn(M, 4, generator=g)}
    logits = {"ta": 3 * torch.randn(M, C, generator=g), "tb": 3 * torch.randn(M, C, generator=g)}
    bank = TeacherBank(emb, logits, labels, torch.arange(M) + 100)
    return LossContext(student_dim=5, num_classes=C, teacher_dims={"ta": 6, "tb": 4}, bank=bank, seed=seed), g


def _norm(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _head(embed, x):
    W, b = embed.linear.weight.detach().double().tolist(), embed.linear.bias.detach().double().tolist()
    return _norm([sum(W[k][j] * x[j] for j in range(len(x))) + b[k] for k in range(len(W))])


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


@pytest.mark.parametrize("mode,positives", [("exact", "own"), ("exact", "relaxed"), ("reference", "relaxed"),
                                            ("reference", "own")])
def test_golden_gacd_module_value(mode, positives):
    """GACDLoss.forward on a fixed tiny batch equals CRD's formula with confidence weights,
    recomputed here in plain python from the module's heads, memories and draws. Relaxed
    positives: the positive row of anchor i is another row of its class, read from the student
    memory in (b) and from the teacher side of that row in (a) (its bank embedding through the
    current teacher head in ``exact``, the teacher memory in ``reference``)."""
    ctx, g = _tiny_ctx()
    tau, N = 0.1, 3
    loss = build_loss("gacd", ctx, num_negatives=N, feat_dim=4, per_sample=True, mode=mode, positives=positives)
    assert isinstance(loss, GACDLoss) and loss.tau == tau and loss.samplers["ta"].mode == "class-aware"
    loss.eval()  # no memory update: the expected value reads the same memory
    index = torch.tensor([0, 4, 7, 10])
    B, M = len(index), ctx.num_rows
    x = DistillInputs(student_emb=torch.randn(B, 5, generator=g), student_logits=torch.zeros(B, 3),
                      labels=ctx.bank.labels[index], index=index,
                      teacher_emb={n: e[index] for n, e in ctx.bank.embeddings.items()},
                      teacher_logits={n: t[index] for n, t in ctx.bank.logits.items()})
    out = loss(x)
    got = out.loss

    expected = 0.0
    for name in ("ta", "tb"):
        term = loss.terms[name]
        negs, valid = loss.samplers[name].sample(index, 0)  # (B, N): the draws CRD uses at step 0
        assert valid.all()  # class-aware per-sample draws: all from other classes
        if positives == "relaxed":
            prow = [int(r) for r in loss.samplers[name].sample_positives(index, 0)]  # the draw at step 0
            labels = ctx.bank.labels.tolist()
            assert all(p != int(i) and labels[p] == labels[int(i)] for p, i in zip(prow, index))  # same class, not itself
        else:
            prow = [int(i) for i in index]
        mem = term.memory.memory.double().tolist()
        bank = ctx.bank.embeddings[name].double().tolist()
        logits = ctx.bank.logits[name].tolist()
        s = [_head(term.embed_s, x.student_emb[i].double().tolist()) for i in range(B)]
        t = [_head(term.embed_t, bank[int(r)]) for r in index]
        if mode == "reference":  # direction (a) reads the teacher memory at the positive and negative rows
            mem_t = term.memory_t.memory.double().tolist()
            t_row = lambda r: mem_t[r]  # noqa: E731
        else:  # the bank's teacher embedding of the row through the current teacher head
            t_row = lambda r: _head(term.embed_t, bank[r])  # noqa: E731
        w = [_softmax_at(logits[int(r)], int(ctx.bank.labels[r])) for r in index]
        assert all(0.0 <= v <= 1.0 for v in w)
        parts = []
        for side in ("a", "b"):
            pos, neg = [], []
            for i in range(B):
                rows = [int(r) for r in negs[i]]
                if side == "a":  # student anchor vs teacher positive / negatives
                    tp = t[i] if (mode, positives) == ("exact", "own") else t_row(prow[i])
                    pos.append(math.exp(_dot(s[i], tp) / tau))
                    neg.append([math.exp(_dot(s[i], t_row(r)) / tau) for r in rows])
                else:  # teacher anchor vs student memory
                    pos.append(math.exp(_dot(t[i], mem[prow[i]]) / tau))
                    neg.append([math.exp(_dot(t[i], mem[r]) / tau) for r in rows])
            z = (sum(pos) + sum(map(sum, neg))) / (B * (1 + N)) * M  # Z fixed from this first batch
            total = 0.0
            for i in range(B):
                pp, pn = pos[i] / z, 1.0 / M
                term_i = math.log(pp / (pp + N * pn + EPS))
                term_i += sum(math.log(N * pn / (q / z + N * pn + EPS)) for q in neg[i])
                total += w[i] * term_i
            parts.append(-total / B)
            assert out.metrics[f"crd/{name}/loss_{side}"].item() == pytest.approx(parts[-1], rel=1e-4)
            assert out.metrics[f"crd/{name}/z_{side}"].item() == pytest.approx(z, rel=1e-5)
        expected += 0.5 * (parts[0] + parts[1])  # uniform teacher weights
        assert out.metrics[f"gacd/{name}/mean_weight"].item() == pytest.approx(sum(w) / B, rel=1e-6)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_mode_and_positives_options():
    ctx, _ = _tiny_ctx()
    d = build_loss("gacd", ctx, num_negatives=4, feat_dim=4)
    assert d.positives == "relaxed" and d.mode == "relax"  # the paper's default: exact teacher side, relaxed positive
    assert build_loss("gacd", ctx, num_negatives=4, feat_dim=4, mode="relax").positives == "relaxed"
    assert build_loss("gacd", ctx, num_negatives=4, feat_dim=4, positives="own").mode == "exact"
    ref = build_loss("gacd", ctx, num_negatives=4, feat_dim=4, mode="reference")
    assert ref.mode == "reference" and ref.positives == "relaxed" and ref.terms["ta"].memory_t is not None
    with pytest.raises(ValueError, match="gacd: mode 'relax' is mode 'exact' with positives 'relaxed'"):
        build_loss("gacd", ctx, mode="relax", positives="own")
    with pytest.raises(ValueError, match="gacd: positives must be one of"):
        build_loss("gacd", ctx, positives="class")
    with pytest.raises(ValueError, match="gacd: mode must be one of"):
        build_loss("gacd", ctx, mode="nope")


def test_float32_under_bf16_autocast():
    """Under a CPU bf16 autocast GACD's loss is float32 and equals the float32 computation of the
    same inputs; a bf16 student embedding (a student run under autocast) is cast to float32 inside."""
    ctx, g = _tiny_ctx(3)
    index = torch.tensor([0, 2, 4, 5, 7, 9])
    B = len(index)
    emb = torch.randn(B, 5, generator=g)
    tlog = {n: t[index] for n, t in ctx.bank.logits.items()}
    temb = {n: e[index] for n, e in ctx.bank.embeddings.items()}
    loss = build_loss("gacd", ctx, num_negatives=4, feat_dim=4, per_sample=False)
    loss.eval()  # memories unchanged, so every call below sees the same state (Z is fixed by the first)
    want = loss(DistillInputs(emb, torch.zeros(B, 3), ctx.bank.labels[index], index, temb, tlog))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss.terms["ta"].embed_s.linear(emb).dtype == torch.bfloat16  # autocast is live for a Linear here
        got = loss(DistillInputs(emb, torch.zeros(B, 3), ctx.bank.labels[index], index, temb, tlog))
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    for k in want.metrics:
        torch.testing.assert_close(got.metrics[k], want.metrics[k], rtol=1e-6, atol=1e-6)
    # bf16 inputs: the loss is the float32 loss of the bf16 values, not a bf16 computation
    e16 = emb.bfloat16()
    t16 = {n: v.bfloat16() for n, v in temb.items()}
    want16 = loss(DistillInputs(e16.float(), torch.zeros(B, 3), ctx.bank.labels[index], index,
                                {n: v.float() for n, v in t16.items()}, tlog))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got16 = loss(DistillInputs(e16, torch.zeros(B, 3), ctx.bank.labels[index], index, t16, tlog))
    assert got16.loss.dtype == torch.float32
    torch.testing.assert_close(got16.loss, want16.loss, rtol=1e-6, atol=1e-6)


def test_weights_are_the_teachers_softmax_at_the_label():
    ctx, g = _tiny_ctx(1)
    loss = build_loss("gacd", ctx, num_negatives=4, feat_dim=4, confidence_temperature=1.0)
    index = torch.tensor([1, 2, 3, 5, 8])
    x = DistillInputs(torch.randn(5, 5, generator=g), torch.zeros(5, 3), ctx.bank.labels[index], index,
                      {}, {n: t[index] for n, t in ctx.bank.logits.items()})
    for name in ("ta", "tb"):
        w = loss.anchor_weights(name, x)
        want = F.softmax(ctx.bank.logits[name][index], 1)[torch.arange(5), ctx.bank.labels[index]]
        assert w.shape == (5,) and ((w >= 0) & (w <= 1)).all()
        torch.testing.assert_close(w, want)
        # without logits in the batch, the teacher bank's row gives the same weight
        bare = DistillInputs(x.student_emb, x.student_logits, x.labels, index)
        torch.testing.assert_close(loss.anchor_weights(name, bare), want)
    assert not torch.allclose(loss.anchor_weights("ta", x), loss.anchor_weights("tb", x))  # per teacher
    hot = build_loss("gacd", ctx, num_negatives=4, feat_dim=4, confidence_temperature=4.0)
    l = ctx.bank.logits["ta"][index]
    torch.testing.assert_close(hot.anchor_weights("ta", x), F.softmax(l / 4, 1)[torch.arange(5), ctx.bank.labels[index]])
    with pytest.raises(ValueError, match="confidence_temperature must be > 0"):
        build_loss("gacd", ctx, confidence_temperature=0.0)


def test_fully_confident_teacher_gives_plain_crd_and_defaults_are_the_papers():
    ctx, g = _tiny_ctx(2)
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    labels = ctx.bank.labels[index]
    sure = {n: 50.0 * F.one_hot(labels, 3).float() for n in ctx.teachers}  # p(y|x) = 1
    x = DistillInputs(torch.randn(6, 5, generator=g), torch.zeros(6, 3), labels, index,
                      {n: e[index] for n, e in ctx.bank.embeddings.items()}, sure)
    kw = {"num_negatives": 8, "feat_dim": 4, "tau": 0.1, "per_sample": False}
    torch.manual_seed(0)  # the heads' init draws from the global RNG
    gacd = build_loss("gacd", ctx, positives="own", **kw)
    torch.manual_seed(0)
    crd = build_loss("crd", ctx, mode="exact", **kw)  # GACD's default mode
    g_out, c_out = gacd(x), crd(x)
    torch.testing.assert_close(g_out.loss, c_out.loss)  # same seeds: same heads, memory and draws
    assert all(g_out.metrics[f"gacd/{n}/mean_weight"].item() == pytest.approx(1.0) for n in ctx.teachers)
    assert set(g_out.metrics) - set(c_out.metrics) == {f"gacd/{n}/mean_weight" for n in ctx.teachers}
    meta = LOSSES.meta("gacd")
    assert meta["needs_teachers"] and "2009.09922" in meta["paper"]
    d = build_loss("gacd", ctx)
    assert d.num_negatives == 16384 and d.tau == 0.1 and d.samplers["ta"].mode == "class-aware"
    assert d.positives == "relaxed" and d.confidence_temperature == 1.0
    import inspect

    crd_opts = set(inspect.signature(CRDLoss).parameters)
    assert crd_opts <= set(inspect.signature(GACDLoss).parameters)  # every CRD option passes through
    with pytest.raises(ValueError, match="loss 'gacd': bad options"):
        build_loss("gacd", ctx, nope=1)


# -- PGD -------------------------------------------------------------------------------------

def test_pgd_is_projected_frozen_and_deterministic():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model.train()  # PGD must still run it in eval mode, then restore
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    gens = lambda: row_generators(3, np.arange(32), np.ones(32))  # noqa: E731
    d1 = pgd_perturb(model, x, y, 0.2, 5, 0.05, gens(), random_start=True, objective="ce")
    d2 = pgd_perturb(model, x, y, 0.2, 5, 0.05, gens(), random_start=True, objective="ce")
    assert d1.shape == x.shape and not d1.requires_grad and torch.equal(d1, d2)
    assert d1.abs().max() <= 0.2 and d1.abs().max() > 0.1
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        ce = lambda z: F.cross_entropy(model(z), y).item()  # noqa: E731
        assert ce(x + d1) > ce(x)
    # a row's start depends on (seed, sample_id, view) only, not on its batch
    part = pgd_perturb(model, x[:4], y[:4], 0.2, 1, 0.05, row_generators(3, np.arange(4), np.ones(4)), True, "ce")
    full = pgd_perturb(model, x, y, 0.2, 1, 0.05, gens(), True, "ce")
    torch.testing.assert_close(part, full[:4])
    # without a random start CE still moves (its gradient at delta = 0 is not 0)
    d0 = pgd_perturb(model, x, y, 0.2, 1, 0.05, random_start=False, objective="ce")
    assert torch.equal(d0.abs(), torch.full_like(d0, 0.05))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        pgd_perturb(model, x, y, 0.0, 1, 0.1)
    with pytest.raises(ValueError, match="the ce objective needs the labels"):
        pgd_perturb(model, x, None, 0.2, 1, 0.1, objective="ce")


class _Identity(torch.nn.Module):
    """(embedding, logits) = (x, x @ W): a model whose feature is its input."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(2, 3)

    def forward(self, x):
        return x, self.head(x)


def test_self_supervised_pgd_hand_computed_step():
    """One step of -cos(f(x + delta), f(x)) ascent with f = identity, worked by hand: at x = (1, 0)
    and v = x + delta, d(-cos)/d delta_1 = -delta_2^2 / |v|^3 < 0 and d(-cos)/d delta_2 =
    (1 + delta_1) delta_2 / |v|^3 (the sign of delta_2): the step rotates v away from x."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    eps, step = 0.3, 0.1
    gens = row_generators(7, np.array([11, 12]), np.array([1, 1]))
    start = [(2.0 * torch.rand(2, generator=g) - 1.0) * eps for g in row_generators(7, np.array([11, 12]), np.array([1, 1]))]
    got = pgd_perturb(_Identity(), x, None, eps, 1, step, gens)  # the default objective, no label
    for b in range(2):
        d1, d2 = float(start[b][0]), float(start[b][1])
        assert d2 != 0.0
        want = [min(max(d1 - step, -eps), eps), min(max(d2 + step * math.copysign(1.0, d2), -eps), eps)]
        assert got[b].tolist() == pytest.approx(want, abs=1e-6)


def test_self_supervised_pgd_needs_no_label_and_moves_the_feature():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    x = torch.randn(64, 8)
    gens = lambda: row_generators(1, np.arange(64), np.full(64, 2))  # noqa: E731
    d = pgd_perturb(model, x, None, 0.25, 6, 0.06, gens())
    assert d.abs().max() <= 0.25 and not d.requires_grad
    # the labels play no part: any y (or none) gives the same delta
    torch.testing.assert_close(pgd_perturb(model, x, torch.randint(0, 6, (64,)), 0.25, 6, 0.06, gens()), d, rtol=0, atol=0)
    # a row's delta depends on that row only (a stored shard must not depend on the embed batch)
    torch.testing.assert_close(pgd_perturb(model, x[10:13], None, 0.25, 6, 0.06, gens()[10:13]), d[10:13])
    with torch.no_grad():
        cos = lambda dd: F.cosine_similarity(model(x + dd), model(x), dim=1)  # noqa: E731
        noise = (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) - 1) * 0.25  # same radius
        assert cos(d).mean() < cos(noise).mean() - 0.05  # PGD turned the features away, beyond random noise
    with pytest.raises(ValueError, match="self-supervised objective needs random_start"):
        pgd_perturb(model, x, None, 0.25, 1, 0.1, random_start=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        pgd_perturb(model, x, None, 0.25, 1, 0.1, gens(), objective="kl")


def test_config_objective_field(tmp_path):
    assert AdversarialConfig().objective == "self-supervised"
    assert AdversarialConfig(enabled=True, objective="ce", random_start=False).random_start is False
    assert AdversarialConfig(enabled=False, random_start=False).objective == "self-supervised"  # off: not checked
    with pytest.raises(ConfigError, match=r"embed.adversarial: .*needs random_start"):
        tiny_config(tmp_path, **{"embed.adversarial": {"enabled": True, "random_start": False}})
    with pytest.raises(ConfigError, match=r"embed.adversarial.objective"):
        tiny_config(tmp_path, **{"embed.adversarial": {"enabled": True, "objective": "kl"}})


# -- stored adversarial views ------------------------------------------------------------------

VIEWS = ViewsConfig(num_views=2, crop_padding=2, flip=True, seed=3)
ADV = AdversarialConfig(enabled=True, num_views=2, epsilon=0.3, steps=3, step_size=0.15, seed=5)


def _write(teacher, ds, root, views=VIEWS, adv=ADV, batch_size=4000):
    ecfg = EmbedConfig(batch_size=batch_size, rows_per_part=700, views=views, adversarial=adv)
    key = shard_key(teacher.name, teacher.content_hash, ds, ds.fingerprint(), view_recipe(views, adv), "float32")
    *_, manifest = write_shard(teacher, ds, key, root, ecfg, torch.device("cpu"), amp=False)
    return root / key.dirname, manifest


@pytest.fixture(scope="module")
def adv_shards(trained, tmp_path_factory):
    """Test-split shards of both tiny teachers with 2 views + 2 PGD views per sample (in-process)."""
    _, paths = trained
    root = tmp_path_factory.mktemp("gacd-shards")
    ds = build_dataset("uci-mfeat", "test")
    teachers = {n: load_teacher(paths[n], name=n) for n in ("pix_cnn", "kar_mlp")}
    dirs = {n: _write(t, ds, root)[0] for n, t in teachers.items()}
    return ds, teachers, dirs, root


def _teacher_adv_inputs(teacher, ds, views, adv):
    """The teacher's perturbed input of every adversarial row, recomputed from scratch: view a % V of
    each sample (drawn here from the recipe), then PGD with the per-(sample_id, view) seeds."""
    V, A, n = views.num_views, adv.num_views, len(ds)
    b = ds.get_batch(np.arange(n), [teacher.modality])
    x, y, sid = b["inputs"][teacher.modality], b["label"], b["sample_id"].numpy()
    vp = draw_views(sid, V, views.crop_padding, views.flip, views.include_clean, views.seed)
    base = np.arange(A) % V
    pick = (np.arange(n)[:, None] * V + base[None, :]).reshape(-1)  # (n*A,) normal-view row of each adversarial row
    xs = x.repeat_interleave(A, 0)  # (n*A, ...)
    if ds.spec(teacher.modality).kind == "image":
        xs = apply_view(xs, torch.from_numpy(vp.top[pick]), torch.from_numpy(vp.left[pick]), torch.from_numpy(vp.flip[pick]),
                        views.crop_padding)
    ids, vids = np.repeat(sid, A), np.tile(V + np.arange(A), n)
    delta = pgd_perturb(teacher.model, xs, y.repeat_interleave(A), adv.epsilon, adv.steps, adv.step_size,
                        row_generators(adv.seed, ids, vids), adv.random_start, adv.objective)
    # the random start alone: uniform in the epsilon ball from the same per-row generators
    start = torch.stack([(2.0 * torch.rand(xs.shape[1:], generator=g) - 1.0) * adv.epsilon
                         for g in row_generators(adv.seed, ids, vids)])
    return xs + delta, xs, y.repeat_interleave(A), xs + start


@pytest.mark.parametrize("student", ["pix", "kar"])
def test_adversarial_rows_replay_exactly_and_raise_the_teachers_loss(adv_shards, student):
    ds, teachers, dirs, _ = adv_shards
    name = {"pix": "pix_cnn", "kar": "kar_mlp"}[student]
    t = teachers[name]
    V, A, n = VIEWS.num_views, ADV.num_views, len(ds)
    ss = ShardSet.open(list(dirs.values()))  # row-aligned on (sample_id, view) across the two teachers
    s = ss.shards[name]
    assert len(ss) == n * (V + A)
    assert (s.views["view"].reshape(n, V + A) == torch.arange(V + A)).all()  # sample-major, adversarial last
    delta = full(s.adv_delta).reshape(n, V + A, -1)
    assert (delta[:, :V] == 0).all() and (delta[:, V:].abs().amax((1, 2)) > 0).all()
    assert delta.abs().max() <= ADV.epsilon
    assert s.manifest["views"]["adversarial"] == to_dict(ADV) and s.manifest["teacher"]["adv_dim"] == ds.spec(student).numel

    dd = DistillData(ds, student, dirs)  # infers the teacher of the student's modality
    adv_rows = torch.nonzero(ss.views["view"] >= V)[:, 0]  # (n*A,) sample-major like the recomputation
    got = dd.batch(adv_rows, torch.device("cpu"))["x"]
    want, clean, y, started = _teacher_adv_inputs(t, ds, VIEWS, ADV)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit
    # normal rows are the plain replayed views, untouched by the deltas
    normal = torch.nonzero(ss.views["view"] < V)[:, 0]  # (n*V,)
    xn = ds.get_batch(np.arange(n), [student])["inputs"][student].repeat_interleave(V, 0)  # (n*V, ...)
    if ds.spec(student).kind == "image":
        vp = draw_views(ds.sample_ids, V, VIEWS.crop_padding, VIEWS.flip, VIEWS.include_clean, VIEWS.seed)
        xn = apply_view(xn, torch.from_numpy(vp.top), torch.from_numpy(vp.left), torch.from_numpy(vp.flip), VIEWS.crop_padding)
    assert torch.equal(dd.batch(normal, torch.device("cpu"))["x"].view(torch.int32), xn.view(torch.int32))
    # the stored teacher outputs are the teacher's on that input, and PGD raised its objective (the
    # default, self-supervised: the teacher's feature of the view turned away from the clean view's)
    # beyond where its random start had it
    t.model.eval()
    with torch.no_grad():
        emb_adv, logits_adv = t.model(got)
        emb_clean, _ = t.model(clean)
        emb_start, _ = t.model(started)
    torch.testing.assert_close(s.logits[adv_rows], logits_adv, rtol=1e-4, atol=1e-4)
    assert ADV.objective == "self-supervised"
    cos_adv = F.cosine_similarity(emb_adv.flatten(1), emb_clean.flatten(1), dim=1).mean().item()
    cos_start = F.cosine_similarity(emb_start.flatten(1), emb_clean.flatten(1), dim=1).mean().item()
    assert cos_adv < cos_start - 0.01


def test_replay_teacher_choice_is_explicit_when_needed(adv_shards):
    ds, teachers, dirs, root = adv_shards
    with pytest.raises(ValueError, match=r"modality 'fou'.*embed without embed.adversarial"):
        DistillData(ds, "fou", dirs)  # cross-modal student: it cannot see the teachers' perturbed inputs
    with pytest.raises(ValueError, match=r"adv_replay_teacher: teacher 'kar_mlp' reads modality 'kar'"):
        DistillData(ds, "pix", dirs, adv_replay_teacher="kar_mlp")
    with pytest.raises(ValueError, match=r"adv_replay_teacher: 'nope' is not a distill teacher"):
        DistillData(ds, "pix", dirs, adv_replay_teacher="nope")
    # two teachers of the student's modality: ambiguous until one is named
    twin = load_teacher(teachers["pix_cnn"].path, name="pix_twin")
    twin_dir, _ = _write(twin, ds, root)
    both = {"pix_cnn": dirs["pix_cnn"], "pix_twin": twin_dir}
    with pytest.raises(ValueError, match=r"Set distill.adv_replay_teacher to one of \['pix_cnn', 'pix_twin'\]"):
        DistillData(ds, "pix", both)
    dd = DistillData(ds, "pix", both, adv_replay_teacher="pix_twin")
    torch.testing.assert_close(full(dd.adv_delta), full(Shard(twin_dir).adv_delta))


def test_shards_without_adversarial_views_keep_schema_id_and_read(adv_shards):
    ds, teachers, _, root = adv_shards
    off = AdversarialConfig(enabled=False, epsilon=0.3)
    assert view_recipe(VIEWS, off) == view_recipe(VIEWS) == to_dict(VIEWS)  # ids of existing shards unchanged
    d, m = _write(teachers["kar_mlp"], ds, root, views=ViewsConfig(), adv=off)
    s = Shard(d, verify=True)
    assert s.adv_delta is None and "adv_dim" not in m["teacher"] and "kar_mlp.adv_delta" not in s.table.column_names
    dd = DistillData(ds, "kar", {"kar_mlp": d}, adv_replay_teacher="kar_mlp")  # nothing to replay: ignored
    assert dd.adv_delta is None and len(dd) == len(ds)


def test_shard_id_changes_with_the_adversarial_recipe(trained, tmp_path):
    def sid(views, adv):
        return ShardKey("t", "c" * 64, "uci-mfeat", "train", "f" * 64, view_recipe(views, adv), "float32").shard_id

    base = ViewsConfig()
    ids = {
        sid(base, None),
        sid(base, AdversarialConfig(enabled=True)),
        sid(base, AdversarialConfig(enabled=True, epsilon=0.2)),
        sid(base, AdversarialConfig(enabled=True, steps=7)),
        sid(base, AdversarialConfig(enabled=True, seed=1)),
        sid(base, AdversarialConfig(enabled=True, num_views=2)),
        sid(base, AdversarialConfig(enabled=True, objective="ce")),
        sid(base, AdversarialConfig(enabled=True, objective="ce", random_start=False)),
    }
    assert len(ids) == 8
    assert sid(base, AdversarialConfig(enabled=False, epsilon=0.2)) == sid(base, None)
    # the planner puts the config's adversarial recipe in every key
    _, paths = trained

    def planned(**adv):
        cfg = tiny_config(tmp_path, **{"embed.splits": ["train"], "embed.adversarial": adv})
        plan = plan_shards(teacher_set(paths), cfg.data, ["train"], cfg.embed, cfg.output_dir)
        return {name: key.shard_id for name, _, key, _ in plan}

    plain, on, other = planned(), planned(enabled=True), planned(enabled=True, epsilon=0.05)
    assert planned(enabled=False, steps=9) == plain
    assert all(len({plain[n], on[n], other[n]}) == 3 for n in plain)


# -- end to end --------------------------------------------------------------------------------

def test_distill_ce_kd_gacd_on_adversarial_shards(ray_cluster, trained, tmp_path):
    cfg0, _ = trained
    shutil.copytree(cfg0.checkpoint_dir, tmp_path / "teachers")
    cfg = tiny_config(tmp_path, **{
        "embed.splits": ["train"],
        "embed.adversarial": {"enabled": True, "num_views": 1, "epsilon": 0.2, "steps": 2, "step_size": 0.1},
        "distill.teachers": ["pix_cnn", "kar_mlp"],
        "distill.student": {"arch": "mlp", "modality": "kar", "arch_kwargs": {"hidden": [32]}},
        "distill.losses": [{"name": "ce"}, {"name": "kd"},
                           {"name": "gacd", "weight": 0.8, "kwargs": {"num_negatives": 64, "per_sample": False, "feat_dim": 16}}],
        "distill.epochs": 1, "distill.batch_size": 128, "distill.cpus_per_worker": 0.5, "tracking.enabled": False,
    })
    res = embed(cfg)
    assert {r.rows for r in res} == {2 * 1500}  # 1 clean + 1 adversarial view per sample
    out = run_distill(cfg)
    last = out.history[-1]
    for k in ("loss/ce", "loss/kd", "loss/gacd", "loss/total"):
        assert k in last and math.isfinite(last[k])
    assert last["loss/gacd"] > 0
