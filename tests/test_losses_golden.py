"""Golden values of VID, FitNet, PKT, RKD, SP, CC and DKD: each computed here from the formula
(the reference's; the paper's where an option departs from it) with explicit python loops (numpy
for small linear algebra), on a fixed tiny input with the trainable parts set to known values,
and compared with the pure function and the module (``LossOutput.loss``; VID's metrics too). The
reference's own outputs are replayed in tests/test_reference_losses.py; these add the ensembles,
the options and hand-checkable cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ensemble_kd.losses import DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses import functional as fn
from ensemble_kd.losses.cc import taylor_cc, taylor_correlation
from ensemble_kd.losses.dkd import dkd_ensemble_loss, dkd_loss, dkd_terms, ensemble_logits, warmup_factor
from ensemble_kd.losses.kd import kd_loss

# B = 4 samples, student dim 3, teachers "a" (dim 2) and "b" (dim 4), C = 3 classes
S = [[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-0.2, 0.8, 0.1], [2.5, 2.2, -1.9]]
TA = [[1.0, 0.0], [0.2, -1.3], [-0.6, 0.9], [3.0, 1.0]]
TB = [[0.3, 1.1, -0.4, 2.0], [0.0, -0.5, 1.2, 0.7], [1.4, 0.2, 0.2, -1.0], [-0.8, 0.6, 0.9, 0.1]]
S_LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.2, 0.1, -0.3], [0.4, 0.4, 1.9]]
A_LOGITS = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0], [3.5, -1.0, 0.5], [0.0, 1.5, 2.5]]
B_LOGITS = [[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, -2.0], [-1.0, 0.5, 4.0]]
LABELS = [1, 2, 0, 2]
W_REG = [[0.5, -0.25, 1.0], [0.1, 0.2, -0.3]]  # (d_t=2, d_s=3) a fixed regressor for teacher "a"
B_REG = [0.05, -0.1]


def t64(v):
    return torch.tensor(v, dtype=torch.float64)


def ctx_of(teachers=("a", "b")) -> LossContext:
    emb = {"a": t64(TA), "b": t64(TB)}
    logits = {"a": t64(A_LOGITS), "b": t64(B_LOGITS)}
    bank = TeacherBank({n: emb[n] for n in teachers}, {n: logits[n] for n in teachers},
                       torch.tensor(LABELS), torch.arange(4))
    return LossContext(student_dim=3, num_classes=3, teacher_dims={n: emb[n].shape[1] for n in teachers}, bank=bank)


def inputs(teachers=("a", "b"), epoch: int = 0) -> DistillInputs:
    emb = {"a": t64(TA), "b": t64(TB)}
    logits = {"a": t64(A_LOGITS), "b": t64(B_LOGITS)}
    return DistillInputs(t64(S), t64(S_LOGITS), torch.tensor(LABELS), torch.arange(4),
                         {n: emb[n] for n in teachers}, {n: logits[n] for n in teachers}, epoch=epoch)


def matvec(W, b, x):
    return [sum(W[o][i] * x[i] for i in range(len(x))) + b[o] for o in range(len(W))]


def set_linear(lin: torch.nn.Linear, W, b) -> None:
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W, dtype=lin.weight.dtype))
        lin.bias.copy_(torch.tensor(b, dtype=lin.bias.dtype))


# -- VID ------------------------------------------------------------------------------------
def vid_golden(mu, t, alpha, eps, mean=False):
    """mean_b sum_c 0.5 [log var_c + (t - mu)^2 / var_c], var_c = log(1 + exp(alpha_c)) + eps the
    VARIANCE (the reference's pred_var); divided by C when ``mean`` (the reference's element mean)."""
    var = [math.log(1.0 + math.exp(a)) + eps for a in alpha]
    total = 0.0
    for mb, tb in zip(mu, t):
        row = sum(0.5 * (math.log(v) + (tc - mc) ** 2 / v) for mc, tc, v in zip(mb, tb, var))
        total += row / (len(var) if mean else 1)
    return total / len(mu)


def test_vid_golden_function_and_module():
    eps, alpha = 1e-5, [0.3, -1.2]
    mu = [matvec(W_REG, B_REG, s) for s in S]
    want_mean = vid_golden(mu, TA, alpha, eps, mean=True)
    assert fn.vid(t64(mu), t64(TA), t64(alpha), eps).item() == pytest.approx(want_mean, rel=1e-9)
    # the module, one teacher: its regressor and alphas set to the values above; default: channel sum
    want = vid_golden(mu, TA, alpha, eps)
    mod = build_loss("vid", ctx_of(("a",)), init_var=5.0, eps=eps).double()
    head = mod.emb_heads["a"]
    set_linear(head.regressor, W_REG, B_REG)
    with torch.no_grad():
        head.alpha.copy_(t64(alpha))
    out = mod(inputs(("a",)))
    assert out.loss.item() == pytest.approx(want, rel=1e-9)
    # metrics: the teacher's term and the mean standard deviation sqrt(var), from the hand values
    std = [math.sqrt(math.log(1.0 + math.exp(a)) + eps) for a in alpha]
    assert set(out.metrics) == {"vid/a/loss", "vid/a/sigma_emb"}
    assert out.metrics["vid/a/loss"].item() == pytest.approx(want, rel=1e-9)
    assert out.metrics["vid/a/sigma_emb"].item() == pytest.approx(sum(std) / 2, rel=1e-9)
    mean_mod = build_loss("vid", ctx_of(("a",)), eps=eps, channel_reduction="mean").double()
    mean_mod.load_state_dict(mod.state_dict())
    assert mean_mod(inputs(("a",))).loss.item() == pytest.approx(want_mean, rel=1e-9)


def test_vid_init_var_is_the_variance_and_ensemble_with_logits():
    """init_var is the initial VARIANCE softplus(alpha) + eps (the reference's init_pred_var):
    with a zero regressor the initial loss is 0.5 * (log 5 + t^2 / 5) per element, by hand."""
    ctx = ctx_of()
    mod = build_loss("vid", ctx, init_var=5.0, target="both", teacher_weights={"a": 1.0, "b": 3.0}).double()
    for heads in (mod.emb_heads, mod.logit_heads):
        for h in heads.values():
            var = torch.nn.functional.softplus(h.alpha) + 1e-5
            assert torch.allclose(var, torch.full_like(var, 5.0), atol=1e-9)
    assert mod.emb_heads["b"].regressor.weight.shape == (4, 3) and mod.logit_heads["a"].regressor.weight.shape == (3, 3)
    one = build_loss("vid", ctx_of(("a",)), init_var=5.0, channel_reduction="mean").double()
    with torch.no_grad():
        one.emb_heads["a"].regressor.weight.zero_()
        one.emb_heads["a"].regressor.bias.zero_()
    by_hand = sum(0.5 * (math.log(5.0) + t * t / 5.0) for row in TA for t in row) / 8
    assert one(inputs(("a",))).loss.item() == pytest.approx(by_hand, rel=1e-6)  # alpha set in float32
    x = inputs()
    want = 0.0
    for name, w, t_emb, t_log in (("a", 0.25, TA, A_LOGITS), ("b", 0.75, TB, B_LOGITS)):
        for heads, t in ((mod.emb_heads, t_emb), (mod.logit_heads, t_log)):
            lin = heads[name].regressor
            W, b = lin.weight.tolist(), lin.bias.tolist()
            want += w * vid_golden([matvec(W, b, s) for s in S], t, heads[name].alpha.tolist(), 1e-5)
    out = mod(x)
    assert out.loss.item() == pytest.approx(want, rel=1e-9)
    assert set(out.metrics) == {f"vid/{n}/{k}" for n in "ab" for k in ("loss", "sigma_emb", "sigma_logits")}
    assert out.metrics["vid/b/sigma_logits"].item() == pytest.approx(math.sqrt(5.0), rel=1e-6)  # sqrt(init_var)
    # an MLP regressor option, and clear errors
    mlp = build_loss("vid", ctx, hidden=5)
    assert isinstance(mlp.emb_heads["a"].regressor, torch.nn.Sequential)
    for bad, match in (({"eps": 0.0}, "eps"), ({"target": "feat"}, "target"),
                       ({"channel_reduction": "max"}, "channel_reduction"), ({"init_var": 1e-6}, "init_var")):
        with pytest.raises(ValueError, match=f"vid: {match}"):
            build_loss("vid", ctx, **bad)
    with pytest.raises(ValueError, match="bad options"):  # the old name is gone: `reduction` means teachers
        build_loss("vid", ctx, reduction="mean")


def test_vid_learns_the_noise_scale():
    """A perfect regressor leaves only 0.5 mean log var: minimising drives the variance down (and
    the loss below 0), the information-maximising direction."""
    torch.manual_seed(0)
    t = torch.randn(64, 4)
    alpha = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([alpha], lr=0.5)
    for _ in range(50):
        loss = fn.vid(t + 0.01 * torch.randn(64, 4), t, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0 and (torch.nn.functional.softplus(alpha) < 0.2).all()


# -- FitNet ---------------------------------------------------------------------------------
def test_fitnet_golden_function_and_module():
    reg = [matvec(W_REG, B_REG, s) for s in S]
    want = sum((r - t) ** 2 for rb, tb in zip(reg, TA) for r, t in zip(rb, tb)) / (4 * 2)
    assert fn.hint(t64(reg), t64(TA)).item() == pytest.approx(want, rel=1e-9)
    mod = build_loss("fitnet", ctx_of(), teacher_weights={"a": 1.0}).double()
    set_linear(mod.regressors["a"], W_REG, B_REG)
    assert mod(inputs()).loss.item() == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="hint"):
        fn.hint(t64(reg), t64(TB))


# -- PKT ------------------------------------------------------------------------------------
def pkt_probs(F, eps):
    unit = [[v / (math.sqrt(sum(x * x for x in f)) + eps) for v in f] for f in F]
    K = [[(sum(a * b for a, b in zip(ui, uj)) + 1) / 2 for uj in unit] for ui in unit]
    return [[k / sum(row) for k in row] for row in K]


def pkt_golden(Fs, Ft, eps=1e-7):
    ps, pt = pkt_probs(Fs, eps), pkt_probs(Ft, eps)
    n = len(Fs)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / (n * n)


def test_pkt_golden_function_and_module():
    want_a, want_b = pkt_golden(S, TA), pkt_golden(S, TB)
    assert fn.pkt(t64(S), t64(TA)).item() == pytest.approx(want_a, rel=1e-9)
    assert want_a > 0
    mod = build_loss("pkt", ctx_of())
    assert mod(inputs()).loss.item() == pytest.approx(0.5 * want_a + 0.5 * want_b, rel=1e-9)
    assert fn.pkt(t64(TB), t64(TB)).item() == pytest.approx(0.0, abs=1e-12)


# -- RKD ------------------------------------------------------------------------------------
def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_golden(Fs, Ft, w_d, w_a, branches=None):
    n = len(Fs)

    def dists(F):
        d = [[math.dist(F[i], F[j]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    def angles(F):
        def unit(i, j):  # from F[j] to F[i]
            v = [a - b for a, b in zip(F[i], F[j])]
            norm = math.sqrt(sum(x * x for x in v))
            return [x / norm for x in v] if norm > 0 else [0.0] * len(v)

        return {(i, j, k): sum(a * b for a, b in zip(unit(i, j), unit(k, j)))
                for i in range(n) for j in range(n) for k in range(n)}

    ds, dt = dists(Fs), dists(Ft)
    diffs = [ds[i][j] - dt[i][j] for i in range(n) for j in range(n)]
    a_s, a_t = angles(Fs), angles(Ft)
    adiffs = [a_s[key] - a_t[key] for key in a_s]
    if branches is not None:
        branches.update(abs(x) >= 1 for x in diffs + adiffs)
    return w_d * sum(map(huber, diffs)) / n ** 2 + w_a * sum(map(huber, adiffs)) / n ** 3


def test_rkd_golden_function_and_module():
    far = [[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0], [6.0, 5.0, 4.0]]  # an outlier: |psi_s - psi_t| > 1
    seen: set = set()
    want = rkd_golden(far, TA, 25, 50, seen)
    assert seen == {True, False}  # both Huber branches are exercised
    assert fn.rkd(t64(far), t64(TA)).item() == pytest.approx(want, rel=1e-9)
    assert fn.rkd(t64(S), t64(TB), 2.0, 0.5).item() == pytest.approx(rkd_golden(S, TB, 2.0, 0.5), rel=1e-9)
    mod = build_loss("rkd", ctx_of(), w_dist=3.0, w_angle=7.0, teacher_weights={"a": 2.0, "b": 2.0})
    want_mod = 0.5 * rkd_golden(S, TA, 3.0, 7.0) + 0.5 * rkd_golden(S, TB, 3.0, 7.0)
    assert mod(inputs()).loss.item() == pytest.approx(want_mod, rel=1e-9)
    # invariant to the student's scale (distances are normalised by their mean; angles are angles)
    assert fn.rkd(t64(S) * 7.5, t64(TA)).item() == pytest.approx(fn.rkd(t64(S), t64(TA)).item(), rel=1e-9)
    with pytest.raises(ValueError, match="rkd"):
        build_loss("rkd", ctx_of(), w_dist=0.0, w_angle=0.0)


# -- SP -------------------------------------------------------------------------------------
def sp_golden(Fs, Ft):
    def gram(F):
        G = np.array(F) @ np.array(F).T
        return G / np.linalg.norm(G, axis=1, keepdims=True)

    n = len(Fs)
    Gs, Gt = gram(Fs), gram(Ft)
    return sum((Gt[i, j] - Gs[i, j]) ** 2 for i in range(n) for j in range(n)) / (n * n)


def test_sp_golden_function_and_module():
    want_a, want_b = sp_golden(S, TA), sp_golden(S, TB)
    assert fn.sp(t64(S), t64(TA)).item() == pytest.approx(want_a, rel=1e-9)
    mod = build_loss("sp", ctx_of(), teacher_weights={"a": 1.0, "b": 3.0})
    assert mod(inputs()).loss.item() == pytest.approx(0.25 * want_a + 0.75 * want_b, rel=1e-9)
    assert fn.sp(t64(S), 3.0 * t64(S)).item() == pytest.approx(0.0, abs=1e-12)  # scale-free


# -- CC -------------------------------------------------------------------------------------
def cc_matrix(F, gamma, order):
    unit = [[v / math.sqrt(sum(x * x for x in f)) for v in f] for f in F]
    n = len(F)
    C = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            sim = sum(a * b for a, b in zip(unit[i], unit[j]))
            C[i][j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim ** p for p in range(order + 1))
    return C


def cc_golden(Fs, Ft, gamma=0.4, order=2):
    Cs, Ct = cc_matrix(Fs, gamma, order), cc_matrix(Ft, gamma, order)
    n = len(Fs)
    return sum((Ct[i][j] - Cs[i][j]) ** 2 for i in range(n) for j in range(n)) / (n * n)


def cc_reference_golden(Fs, Ft):
    """RepDistiller's Correlation: delta = |f_s - f_t|; mean over b < B-1 of sum_c delta_b,c delta_b+1,c."""
    delta = [[abs(a - b) for a, b in zip(rs, rt)] for rs, rt in zip(Fs, Ft)]
    return sum(sum(x * y for x, y in zip(delta[i], delta[i + 1])) for i in range(len(delta) - 1)) / (len(delta) - 1)


def test_cc_reference_kernel_golden_function_and_module():
    """The default kernel is RepDistiller's: after the heads, on consecutive rows of the batch."""
    tb3 = [row[:3] for row in TB]
    assert fn.cc(t64(S), t64(tb3)).item() == pytest.approx(cc_reference_golden(S, tb3), rel=1e-12)
    mod = build_loss("cc", ctx_of(("a",)), feat_dim=2).double()
    assert mod.kernel == "reference"
    Ws, bs = [[1.0, 0.5, -0.5], [0.0, 2.0, 1.0]], [0.1, 0.0]
    Wt, bt = [[0.3, -1.0], [1.0, 1.0]], [0.0, 0.2]
    set_linear(mod.embed_s["a"], Ws, bs)
    set_linear(mod.embed_t["a"], Wt, bt)
    want = cc_reference_golden([matvec(Ws, bs, s) for s in S], [matvec(Wt, bt, t) for t in TA])
    assert mod(inputs(("a",))).loss.item() == pytest.approx(want, rel=1e-9)
    student_only = build_loss("cc", ctx_of(("a",)), feat_dim=2, embed="student").double()
    set_linear(student_only.embed_s["a"], Ws, bs)
    assert student_only(inputs(("a",))).loss.item() == pytest.approx(
        cc_reference_golden([matvec(Ws, bs, s) for s in S], TA), rel=1e-9)
    with pytest.raises(ValueError, match="cc: kernel 'reference' with embed 'none'"):
        build_loss("cc", ctx_of(("a",)), embed="none")  # 3 student dims, 2 teacher dims
    with pytest.raises(ValueError, match="cc: kernel must be"):
        build_loss("cc", ctx_of(("a",)), kernel="rbf")


def test_cc_taylor_kernel_golden_function_and_module():
    assert taylor_cc(t64(S), t64(TA)).item() == pytest.approx(cc_golden(S, TA), rel=1e-9)
    assert taylor_cc(t64(S), t64(TB), 0.7, 3).item() == pytest.approx(cc_golden(S, TB, 0.7, 3), rel=1e-9)
    # a high order approaches the exact Gaussian RBF kernel exp(-gamma ||x - y||^2) of the unit rows
    unit = np.array(S) / np.linalg.norm(S, axis=1, keepdims=True)
    rbf = np.exp(-0.4 * ((unit[:, None, :] - unit[None, :, :]) ** 2).sum(-1))
    assert np.allclose(taylor_correlation(t64(S), 0.4, 12).numpy(), rbf, atol=1e-9)
    # the module without heads, then with fixed heads on both sides
    raw = build_loss("cc", ctx_of(("b",)), embed="none", kernel="taylor")
    assert raw(inputs(("b",))).loss.item() == pytest.approx(cc_golden(S, TB), rel=1e-9)
    mod = build_loss("cc", ctx_of(("a",)), feat_dim=2, kernel="taylor").double()
    Ws, bs = [[1.0, 0.5, -0.5], [0.0, 2.0, 1.0]], [0.1, 0.0]
    Wt, bt = [[0.3, -1.0], [1.0, 1.0]], [0.0, 0.2]
    set_linear(mod.embed_s["a"], Ws, bs)
    set_linear(mod.embed_t["a"], Wt, bt)
    want = cc_golden([matvec(Ws, bs, s) for s in S], [matvec(Wt, bt, t) for t in TA])
    assert mod(inputs(("a",))).loss.item() == pytest.approx(want, rel=1e-9)
    student_only = build_loss("cc", ctx_of(("a",)), feat_dim=2, embed="student", kernel="taylor").double()
    assert len(student_only.embed_t) == 0
    set_linear(student_only.embed_s["a"], Ws, bs)
    assert student_only(inputs(("a",))).loss.item() == pytest.approx(
        cc_golden([matvec(Ws, bs, s) for s in S], TA), rel=1e-9)


# -- DKD ------------------------------------------------------------------------------------
def softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def dkd_golden(s_rows, t_rows, labels, alpha, beta, T):
    """The paper's eqs.: b = [p_y, 1 - p_y]; p^ = softmax over the non-target classes (explicitly,
    no masking trick); (alpha KL(b_t || b_s) + beta KL(p^_t || p^_s)) T^2, batch mean."""
    total = 0.0
    for s, t, y in zip(s_rows, t_rows, labels):
        ps, pt = softmax(s, T), softmax(t, T)
        tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others = [c for c in range(len(s)) if c != y]
        nckd = kl(softmax([t[c] for c in others], T), softmax([s[c] for c in others], T))
        total += (alpha * tckd + beta * nckd) * T * T
    return total / len(s_rows)


def test_dkd_golden_function_and_module():
    s, a, b, y = t64(S_LOGITS), t64(A_LOGITS), t64(B_LOGITS), torch.tensor(LABELS)
    want = dkd_golden(S_LOGITS, A_LOGITS, LABELS, 1.0, 8.0, 4.0)
    assert dkd_loss(s, a, y).item() == pytest.approx(want, rel=1e-9)
    assert dkd_loss(s, b, y, 0.5, 2.0, 2.0).item() == pytest.approx(
        dkd_golden(S_LOGITS, B_LOGITS, LABELS, 0.5, 2.0, 2.0), rel=1e-9)
    # ensembles: per_teacher = weighted sum; mean_probs = DKD against the teachers' probabilities
    # averaged AT T (as KD's mean_probs): logits T log(sum_k w_k softmax(z_k / T))
    per = 0.25 * dkd_golden(S_LOGITS, A_LOGITS, LABELS, 1, 8, 4) + 0.75 * dkd_golden(S_LOGITS, B_LOGITS, LABELS, 1, 8, 4)
    ens = [[4.0 * math.log(0.25 * pa + 0.75 * pb) for pa, pb in zip(softmax(ra, 4.0), softmax(rb, 4.0))]
           for ra, rb in zip(A_LOGITS, B_LOGITS)]
    mean_probs = dkd_golden(S_LOGITS, ens, LABELS, 1, 8, 4)
    ens_t1 = [[math.log(0.25 * pa + 0.75 * pb) for pa, pb in zip(softmax(ra), softmax(rb))]
              for ra, rb in zip(A_LOGITS, B_LOGITS)]
    assert abs(dkd_golden(S_LOGITS, ens_t1, LABELS, 1, 8, 4) - mean_probs) > 1e-3  # the old (T = 1) average differs
    mod_per = build_loss("dkd", ctx_of(), reduction="per_teacher", teacher_weights={"a": 1.0, "b": 3.0})
    mod_mean = build_loss("dkd", ctx_of(), teacher_weights={"a": 1.0, "b": 3.0})
    assert mod_per(inputs()).loss.item() == pytest.approx(per, rel=1e-9)
    assert mod_mean(inputs()).loss.item() == pytest.approx(mean_probs, rel=1e-9)
    # one teacher: mean_probs is plain DKD (log-softmax only shifts each row of logits)
    assert dkd_ensemble_loss(s, [a], y).item() == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="dkd: reduction"):
        build_loss("dkd", ctx_of(), reduction="max")
    with pytest.raises(ValueError, match="dkd: temperature"):
        build_loss("dkd", ctx_of(), temperature=0.0)


def test_dkd_warmup_is_linear_in_the_epoch_then_constant():
    """warmup_epochs = W scales the loss by min(1, (epoch + 1) / W), epoch 0-based (the paper's
    and mdistiller's linear warm-up, min(epoch / W, 1) with 1-based epochs); W = 0 never scales."""
    full = dkd_golden(S_LOGITS, A_LOGITS, LABELS, 1.0, 8.0, 4.0)
    warm = build_loss("dkd", ctx_of(("a",)), warmup_epochs=4)
    plain = build_loss("dkd", ctx_of(("a",)))
    for epoch, factor in ((0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (4, 1.0), (50, 1.0)):
        assert warm(inputs(("a",), epoch=epoch)).loss.item() == pytest.approx(factor * full, rel=1e-9), epoch
        assert plain(inputs(("a",), epoch=epoch)).loss.item() == pytest.approx(full, rel=1e-9), epoch
    assert warmup_factor(0, 1) == 1.0 and warmup_factor(7, 0) == 1.0
    # the gradient is scaled too (the loss is multiplied, not clipped)
    x0, x3 = inputs(("a",), epoch=0), inputs(("a",), epoch=3)
    x0.student_logits.requires_grad_(True)
    x3.student_logits.requires_grad_(True)
    warm(x0).loss.backward()
    warm(x3).loss.backward()
    torch.testing.assert_close(x0.student_logits.grad, 0.25 * x3.student_logits.grad)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="dkd: warmup_epochs"):
            build_loss("dkd", ctx_of(), warmup_epochs=bad)


def test_dkd_decomposes_kd():
    """The paper's eq. (3): KD = TCKD + (1 - p_y^t) NCKD, per sample (here T^2-free on both sides)."""
    T = 4.0
    for i in range(4):
        s, t, y = t64([S_LOGITS[i]]), t64([A_LOGITS[i]]), torch.tensor([LABELS[i]])
        tckd, nckd = dkd_terms(s, t, y, T)
        p_y = softmax(A_LOGITS[i], T)[LABELS[i]]
        kd = kd_loss(s, [t], temperature=T).item() / T ** 2
        assert kd == pytest.approx(tckd.item() + (1 - p_y) * nckd.item(), rel=1e-9)


def test_dkd_mean_probs_decomposes_kd_mean_probs():
    """DKD's and KD's ``mean_probs`` share one target, the teachers' probabilities averaged at T:
    KD(ensemble) = TCKD + (1 - p_y^ens) NCKD per sample, with p^ens = sum_k w_k softmax(z_k / T)."""
    T, w = 4.0, [0.25, 0.75]
    for i in range(4):
        s, y = t64([S_LOGITS[i]]), torch.tensor([LABELS[i]])
        ts = [t64([A_LOGITS[i]]), t64([B_LOGITS[i]])]
        tckd, nckd = dkd_terms(s, ensemble_logits(ts, w, T), y, T)
        p_y = w[0] * softmax(A_LOGITS[i], T)[LABELS[i]] + w[1] * softmax(B_LOGITS[i], T)[LABELS[i]]
        kd = kd_loss(s, ts, T, w, "mean_probs").item() / T ** 2
        assert kd == pytest.approx(tckd.item() + (1 - p_y) * nckd.item(), rel=1e-9)
