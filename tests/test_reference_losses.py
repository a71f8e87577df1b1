"""Losses against the reference implementation's own outputs (RepDistiller, float64, on CPU):
tests/fixtures/repdistiller/losses.pt holds each baseline loss's inputs, value and gradients."""
from pathlib import Path

import pytest
import torch

from ensemble_kd.losses import DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses.at import at_stages
from ensemble_kd.losses.functional import at

FIXTURE = Path(__file__).parent / "fixtures" / "repdistiller" / "losses.pt"


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, weights_only=True)


def _leaves(ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def test_at_equals_the_reference_per_stage_with_both_gradients(ref):
    e = ref["at_p2"]
    g_s, g_t = _leaves(e["inputs"]["g_s"]), _leaves(e["inputs"]["g_t"])
    values = [at(a, b, p=2) for a, b in zip(g_s, g_t)]
    for got, want in zip(values, e["values_per_stage"]):
        assert abs(float(got.detach()) - float(want)) <= 1e-12
    sum(values).backward()
    for side, leaves in (("g_s", g_s), ("g_t", g_t)):
        for got, want in zip(leaves, e["grad"][side]):
            assert want is not None and float((got.grad - want).abs().max()) <= 1e-12, side


def test_registered_at_module_sums_the_intermediate_stages(ref):
    """The module pairs g[1:-1] of each side (stem and embedding left out, as the reference's
    feature lists are sliced) and sums the per-stage values."""
    e = ref["at_p2"]
    g_s, g_t = [t.double() for t in e["inputs"]["g_s"]], [t.double() for t in e["inputs"]["g_t"]]
    B = g_s[0].shape[0]
    stem, emb = torch.randn(B, 4, 8, 8, dtype=torch.float64), torch.randn(B, 6, dtype=torch.float64)
    ctx = LossContext(student_dim=6, num_classes=3, teacher_dims={"t": 6},
                      bank=TeacherBank({}, {}, torch.zeros(B, dtype=torch.int64), torch.arange(B)))
    mod = build_loss("at", ctx)
    x = DistillInputs(emb, torch.zeros(B, 3, dtype=torch.float64), torch.zeros(B, dtype=torch.int64), torch.arange(B),
                      student_feats=[stem, *g_s, emb], teacher_feats={"t": [stem, *g_t, emb]})
    out = mod(x)
    assert abs(float(out.loss) - sum(float(v) for v in e["values_per_stage"])) <= 1e-12
    with pytest.raises(ValueError, match="2 intermediate stages, the teacher 1"):
        at_stages([stem, *g_s, emb], [stem, g_t[0], emb])
    with pytest.raises(ValueError, match="the online data path"):
        mod(DistillInputs(emb, torch.zeros(B, 3), torch.zeros(B, dtype=torch.int64), torch.arange(B)))
