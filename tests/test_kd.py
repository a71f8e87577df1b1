"""KD and CE: golden values computed here from the formula, and the registry wrappers."""
import math

import pytest
import torch

from ensemble_kd.losses import LOSSES, DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses.kd import kd_loss

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T1 = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
T2 = [[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]


def softmax(row, T):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kd_golden_single_teacher():
    T = 4.0
    want = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S, T1)) / 2 * T * T
    got = kd_loss(torch.tensor(S), [torch.tensor(T1)], temperature=T)
    assert abs(float(got) - want) < 1e-6 and want > 0


def test_kd_golden_ensemble_reductions():
    T, w = 2.0, [0.25, 0.75]
    want_mean = 0.0
    want_per = 0.0
    for s, a, b in zip(S, T1, T2):
        pa, pb, ps = softmax(a, T), softmax(b, T), softmax(s, T)
        want_mean += kl([w[0] * x + w[1] * y for x, y in zip(pa, pb)], ps)
        want_per += w[0] * kl(pa, ps) + w[1] * kl(pb, ps)
    want_mean, want_per = want_mean / 2 * T * T, want_per / 2 * T * T
    ts = [torch.tensor(T1), torch.tensor(T2)]
    assert abs(float(kd_loss(torch.tensor(S), ts, T, w, "mean_probs")) - want_mean) < 1e-6
    assert abs(float(kd_loss(torch.tensor(S), ts, T, w, "per_teacher")) - want_per) < 1e-6
    assert want_per > want_mean  # Jensen: KL is convex in the target


def test_kd_is_zero_when_student_matches_and_rejects_bad_options():
    t = torch.tensor(T1)
    assert float(kd_loss(t, [t], 3.0)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(t, [t], 3.0, reduction="max")


def _ctx(teachers=("a", "b", "c")):
    M, C = 20, 3
    bank = TeacherBank({n: torch.randn(M, 5) for n in teachers}, {n: torch.randn(M, C) for n in teachers},
                       torch.arange(M) % C, torch.arange(M))
    return LossContext(student_dim=4, num_classes=C, teacher_dims={n: 5 for n in teachers}, bank=bank)


def test_kd_module_weights_and_errors():
    ctx = _ctx()
    x = DistillInputs(torch.randn(4, 4), torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0]), torch.arange(4),
                      {n: torch.randn(4, 5) for n in "abc"}, {n: torch.randn(4, 3) for n in "abc"})
    only_b = build_loss("kd", ctx, temperature=2.0, teacher_weights={"b": 1.0})
    out = only_b(x)
    assert out.metrics == {}  # KD has no diagnostics
    # weight 1 on "b" alone is plain KD against b: T^2 KL(softmax(b / T) || softmax(s / T)), written out
    T = 2.0
    p_b = torch.softmax(x.teacher_logits["b"] / T, 1)  # (B, C)
    want = (p_b * (p_b.log() - torch.log_softmax(x.student_logits.detach() / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(out.loss, want, atol=1e-6)
    out.loss.backward()
    # d/ds of T^2 KL = T (p_s - p_b) / B: the gradient of KD in closed form
    p_s = torch.softmax(x.student_logits.detach() / T, 1)
    assert torch.allclose(x.student_logits.grad, T * (p_s - p_b) / 4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown teachers"):
        build_loss("kd", ctx, teacher_weights={"z": 1.0})
    with pytest.raises(ValueError, match="needs at least one teacher"):
        build_loss("kd", _ctx(()))
    with pytest.raises(ValueError, match="bad options"):
        build_loss("kd", ctx, temprature=2.0)
    with pytest.raises(ValueError, match="kd: temperature"):
        build_loss("kd", ctx, temperature=0.0)
    with pytest.raises(ValueError, match="kd: reduction"):
        build_loss("kd", ctx, reduction="sum")


def test_ce_needs_no_teacher():
    assert not LOSSES.meta("ce")["needs_teachers"]
    ce = build_loss("ce", _ctx(()))
    logits = torch.tensor(S)
    want = sum(-math.log(softmax(r, 1.0)[y]) for r, y in zip(S, [1, 2])) / 2
    out = ce(DistillInputs(torch.zeros(2, 4), logits, torch.tensor([1, 2]), torch.arange(2)))
    assert abs(float(out.loss) - want) < 1e-6 and out.metrics == {}
    with pytest.raises(ValueError, match="ce: label_smoothing"):
        build_loss("ce", _ctx(()), label_smoothing=1.5)
