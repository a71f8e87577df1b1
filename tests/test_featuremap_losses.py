"""The feature-map losses (fsp, nst, sp_map, hint, vid_map, ft, ab) through their registered modules:
values and gradients against RepDistiller's own outputs (tests/fixtures/repdistiller/losses.pt) where
it has them, hand-computed values otherwise, the staged behaviour of FSP/FT/AB by epoch, the loop's
stage shapes, and one real online-path distillation with all of them."""
from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
import torch

from ensemble_kd.training.loop import stage_shapes
from ensemble_kd.losses import DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses.functional import ab, ab_criterion, factor, ft
from modalities import build_dataset, build_encoder
from tests.helpers import distill_cfg, run_distill

FIXTURE = Path(__file__).parent / "fixtures" / "repdistiller" / "losses.pt"
B = 8


@cache
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def ctx_for(s_shapes, t_shapes: dict, ) -> LossContext:
    bank = TeacherBank({}, {}, torch.zeros(B, dtype=torch.long), torch.arange(B))
    return LossContext(student_dim=4, num_classes=3, teacher_dims={n: 4 for n in t_shapes}, bank=bank,
                       student_feat_shapes=tuple(s_shapes), teacher_feat_shapes=t_shapes)


def shapes(feats) -> tuple:
    return tuple(tuple(f.shape[1:]) for f in feats)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().double().requires_grad_(True)


def inputs(s_feats: list, t_feats: dict, epoch: int = 0) -> DistillInputs:
    logits = torch.zeros(s_feats[0].shape[0], 3, dtype=torch.float64)
    return DistillInputs(s_feats[-1], logits, torch.zeros(len(logits), dtype=torch.long), torch.arange(len(logits)),
                         epoch=epoch, student_feats=s_feats, teacher_feats=t_feats)


def emb() -> torch.Tensor:
    return torch.zeros(B, 4, dtype=torch.float64)


def stem() -> torch.Tensor:
    return torch.zeros(B, 2, 8, 8, dtype=torch.float64)


# -- against the reference's outputs (float64, 1e-6) ------------------------------------------------
def test_fsp_module_gives_the_reference_value_and_gradients():
    r = ref()["fsp"]
    g_s, g_t = [leaf(t) for t in r["inputs"]["g_s"]], [leaf(t) for t in r["inputs"]["g_t"]]
    s, t = g_s + [emb()], g_t + [emb()]  # the module reads g[:-1]: every map, stem included
    mod = build_loss("fsp", ctx_for(shapes(s), {"t": shapes(t)}), init_epochs=1).double()
    out = mod(inputs(s, {"t": t}, epoch=0)).loss
    torch.testing.assert_close(out, torch.tensor(sum(r["values"]), dtype=torch.float64), rtol=0, atol=1e-6)
    out.backward()
    for got, want in zip(g_s + g_t, list(r["grad"]["g_s"]) + list(r["grad"]["g_t"])):
        torch.testing.assert_close(got.grad, want.double(), rtol=0, atol=1e-6)


def test_nst_module_gives_the_reference_value_and_gradients():
    r = ref()["nst"]
    g_s, g_t = [leaf(t) for t in r["inputs"]["g_s"]], [leaf(t) for t in r["inputs"]["g_t"]]
    s, t = [stem(), *g_s, emb()], [stem(), *g_t, emb()]  # the module reads g[1:-1]
    mod = build_loss("nst", ctx_for(shapes(s), {"t": shapes(t)}))
    out = mod(inputs(s, {"t": t})).loss
    torch.testing.assert_close(out, torch.tensor(sum(r["values_per_stage"]), dtype=torch.float64), rtol=0, atol=1e-6)
    out.backward()
    for got, want in zip(g_s + g_t, list(r["grad"]["g_s"]) + list(r["grad"]["g_t"])):
        torch.testing.assert_close(got.grad, want.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1])
def test_sp_map_module_gives_the_reference_value_and_gradients_on_the_last_map(stage):
    r = ref()["sp"]
    f_s, f_t = leaf(r["inputs"]["g_s"][stage]), leaf(r["inputs"]["g_t"][stage])
    s, t = [stem(), f_s, emb()], [stem(), f_t, emb()]  # the module reads g[-2], the last map
    mod = build_loss("sp_map", ctx_for(shapes(s), {"t": shapes(t)}))
    out = mod(inputs(s, {"t": t})).loss
    torch.testing.assert_close(out, torch.tensor(r["values_per_stage"][stage], dtype=torch.float64), rtol=0, atol=1e-6)
    out.backward()
    torch.testing.assert_close(f_s.grad, r["grad"]["g_s"][stage].double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(f_t.grad, r["grad"]["g_t"][stage].double(), rtol=0, atol=1e-6)


def test_vid_map_module_with_the_reference_parameters_gives_its_value_and_gradients():
    r = ref()["vid"]
    x_in, target = leaf(r["inputs"]["input"]), leaf(r["inputs"]["target"])
    s, t = [stem(), x_in, emb()], [stem(), target, emb()]
    mod = build_loss("vid_map", ctx_for(shapes(s), {"t": shapes(t)}), init_pred_var=r["init_pred_var"],
                     eps=r["eps"]).double()
    head = mod.heads["t"][0]
    # at construction the variance is init_pred_var (a variance, not a standard deviation)
    torch.testing.assert_close(torch.nn.functional.softplus(head.log_scale) + r["eps"],
                               torch.full_like(head.log_scale, r["init_pred_var"]), rtol=0, atol=1e-6)
    head.load_state_dict({k: v.double() for k, v in r["params"].items()})  # the reference's own weights and scales
    torch.testing.assert_close(torch.nn.functional.softplus(head.log_scale) + r["eps"], r["pred_var"].double(),
                               rtol=0, atol=1e-6)
    out = mod(inputs(s, {"t": t}))
    torch.testing.assert_close(out.loss, torch.tensor(r["value"], dtype=torch.float64), rtol=0, atol=1e-6)
    out.loss.backward()
    torch.testing.assert_close(x_in.grad, r["grad"]["input"].double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(head.log_scale.grad, r["grad"]["log_scale"].double(), rtol=0, atol=1e-6)
    assert set(out.metrics) == {"vid_map/t/var"}


# -- hand-computed values ----------------------------------------------------------------------------
def test_hint_regresses_the_chosen_stage_with_the_reference_convreg():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 5, 4, 4, generator=g), torch.randn(4, 5)]
    t = [torch.randn(4, 6, 8, 8, generator=g), torch.randn(4, 7, 8, 8, generator=g), torch.randn(4, 7)]
    mod = build_loss("hint", ctx_for(shapes(s), {"t": shapes(t)}), stage=1)
    reg = mod.regressors["t"]
    assert isinstance(reg.conv, torch.nn.ConvTranspose2d) and reg.conv.stride == (2, 2)  # 4x4 -> 8x8, as ConvReg
    with torch.no_grad():  # a zero conv: the train-mode BN gives its bias, ReLU keeps it: r(s) = 0.5 everywhere
        reg.conv.weight.zero_()
        reg.bn.bias.fill_(0.5)
    out = mod(DistillInputs(s[-1], torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.arange(4),
                            student_feats=s, teacher_feats={"t": t})).loss
    torch.testing.assert_close(out, ((0.5 - t[1]) ** 2).mean())
    # ConvReg's other two cases: a stride-2 conv (H_s = 2 H_t) and a (1 + H_s - H_t) kernel
    halve = build_loss("hint", ctx_for(shapes(t), {"t": shapes(s)}), stage=1).regressors["t"].conv
    assert halve.stride == (2, 2) and halve.kernel_size == (3, 3)
    same = build_loss("hint", ctx_for(shapes(t), {"t": shapes(t)}), stage=0).regressors["t"].conv
    assert same.kernel_size == (1, 1)
    with pytest.raises(ValueError, match="hint: stage 2 of the student has shape \\(5,\\), not a feature map"):
        build_loss("hint", ctx_for(shapes(s), {"t": shapes(t)}), stage=2)  # the reference's default: the embedding here


def test_ft_factor_loss_by_hand():
    # one channel, two positions: factor = normalize(f^2) -> [1, 0] against [0, 1]: mean |diff| = 1
    f_s, f_t = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 3.0]]]])
    torch.testing.assert_close(factor(f_s), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(ft(f_s, f_t), torch.tensor(1.0))
    # p2 = 2: mean diff^2 = 1; a 2x2 map against a 1x1 one: the larger is pooled, each factor is [1]
    torch.testing.assert_close(ft(f_s, f_t, p2=2), torch.tensor(1.0))
    torch.testing.assert_close(ft(torch.rand(2, 3, 2, 2) + 0.1, torch.rand(2, 4, 1, 1) + 0.1), torch.tensor(0.0))


def test_ab_criterion_and_stage_weights_by_hand():
    # margin 1: s=-2 (t off): already past -1 -> 0; s=-0.5 (t off): (s+1)^2 = 0.25;
    # s=0.5 (t on): (s-1)^2 = 0.25; s=2 (t on): past +1 -> 0
    s = torch.tensor([-2.0, -0.5, 0.5, 2.0]).view(1, 4, 1, 1)
    t = torch.tensor([-1.0, 0.0, 1.0, 1.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(ab_criterion(s, t), torch.tensor(0.5))
    two = torch.cat([s, s])  # B = 2: each pair 2 * 0.5 = 1.0 / 2 * 3/1000; the shallower weighs 1/2
    vals = ab([two, two], [torch.cat([t, t])] * 2)
    torch.testing.assert_close(torch.stack(vals), torch.tensor([0.5 * 1.0 / 2 * 3 / 1000, 1.0 / 2 * 3 / 1000]))


# -- stages by epoch ---------------------------------------------------------------------------------
def _maps(seed: int, c_s: int = 4, c_t: int = 6, h_s: int = 4, h_t: int = 4):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(B, 2, 8, 8, generator=g), torch.randn(B, c_s, h_s, h_s, generator=g).requires_grad_(True),
         torch.randn(B, 4, generator=g)]
    t = [torch.randn(B, 2, 8, 8, generator=g), torch.randn(B, c_t, h_t, h_t, generator=g), torch.randn(B, 4, generator=g)]
    return s, t


def _x(s, t, epoch):
    return DistillInputs(s[-1], torch.zeros(B, 3), torch.zeros(B, dtype=torch.long), torch.arange(B), epoch=epoch,
                         student_feats=s, teacher_feats={"t": t})


def test_fsp_trains_in_its_init_epochs_only_unless_kept():
    s, t = _maps(0, c_s=6, c_t=6)
    ctx = ctx_for(shapes(s), {"t": shapes(t)})
    mod = build_loss("fsp", ctx, init_epochs=2)
    assert mod(_x(s, t, 1)).loss > 0 and mod(_x(s, t, 2)).loss == 0
    kept = build_loss("fsp", ctx, init_epochs=2, after_init=True)
    torch.testing.assert_close(kept(_x(s, t, 5)).loss, mod(_x(s, t, 0)).loss)
    s4, t4 = _maps(0, c_s=4, c_t=6)
    with pytest.raises(ValueError, match="fsp: stage 1 has 4 channels in the student and 6 in teacher 't'"):
        build_loss("fsp", ctx_for(shapes(s4), {"t": shapes(t4)}))


def test_ab_trains_the_connectors_and_student_in_its_init_epochs_then_is_zero():
    s, t = _maps(1, h_s=4, h_t=8)
    mod = build_loss("ab", ctx_for(shapes(s), {"t": shapes(t)}), init_epochs=1)
    conn = mod.connectors["t"][0]
    out = mod(_x(s, t, 0)).loss
    out.backward()
    assert out > 0 and s[1].grad.abs().sum() > 0 and conn.conv.weight.grad.abs().sum() > 0
    s[1].grad = None
    conn.zero_grad(set_to_none=True)
    after = mod(_x(s, t, 1)).loss
    after.backward()
    assert after == 0 and s[1].grad is None  # the student is not in this term's graph any more
    assert torch.equal(conn.conv.weight.grad, torch.zeros_like(conn.conv.weight))  # in the graph, zero (DDP)
    same_s, same_t = _maps(1, c_s=6, c_t=6)  # equal channels and size: no connector, as the reference
    assert isinstance(build_loss("ab", ctx_for(shapes(same_s), {"t": shapes(same_t)})).connectors["t"][0],
                      torch.nn.Identity)


def test_ft_trains_its_paraphraser_with_its_own_sgd_then_transfers_factors():
    s, t = _maps(2, c_s=4, c_t=6)
    mod = build_loss("ft", ctx_for(shapes(s), {"t": shapes(t)}), init_epochs=2, init_lr=0.05, init_momentum=0.9,
                     init_weight_decay=1e-3)
    para = mod.paraphrasers["t"].net
    assert not any(p.requires_grad for p in para.parameters())  # outside the run's optimiser and DDP
    # the independent expectation: torch.optim.SGD on a copy, MSE(reconstruction, teacher map)
    twin = type(para)(6, 0.5)
    twin.load_state_dict(para.state_dict())
    twin.requires_grad_(True)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for epoch, seed in ((0, 3), (1, 4)):  # two steps: the momentum matters in the second
        _, t_step = _maps(seed, c_t=6)
        want = torch.nn.functional.mse_loss(twin(t_step[1])[1], t_step[1])
        opt.zero_grad()
        want.backward()
        opt.step()
        out = mod(_x(s, t_step, epoch))
        assert out.loss == 0 and set(out.metrics) == {"ft/t/rec"}
        torch.testing.assert_close(out.metrics["ft/t/rec"], want.detach())
    for (name, p), q in zip(para.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    # factor stage: the loss is the factor transfer through the translator; the paraphraser stays
    frozen = {k: v.clone() for k, v in para.state_dict().items()}
    out = mod(_x(s, t, 2))
    with torch.no_grad():
        want = ft(mod.translators["t"](s[1]), para.encoder(t[1]))
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert s[1].grad.abs().sum() > 0 and out.metrics == {}
    assert all(torch.equal(v, frozen[k]) for k, v in para.state_dict().items())


def test_a_feature_map_loss_without_stage_shapes_says_what_is_missing():
    bank = TeacherBank({}, {}, torch.zeros(2, dtype=torch.long), torch.arange(2))
    ctx = LossContext(student_dim=4, num_classes=3, teacher_dims={"t": 4}, bank=bank)
    for name in ("fsp", "nst", "sp_map", "hint", "vid_map", "ft", "ab"):
        with pytest.raises(ValueError, match=f"{name}: needs the stage shapes"):
            build_loss(name, ctx)


def test_stage_shapes_are_the_forward_features_shapes_and_leave_bn_untouched():
    ds = build_dataset("digits", "train")
    model = build_encoder("cnn_small", ds.spec("image"), 10, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = stage_shapes(model, ds.spec("image").shape)
    assert got == ((8, 8, 8), (16, 4, 4), (16,))  # cnn_small: (2w, H, W), (4w, H/2, W/2), (4w,)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- one real online-path distillation with every feature-map loss -----------------------------------
FEATURE_MAP_LOSSES = [
    {"name": "fsp", "weight": 1.0, "kwargs": {"init_epochs": 1}},
    {"name": "nst", "weight": 50.0},
    {"name": "sp_map", "weight": 3000.0},
    {"name": "hint", "weight": 1.0, "kwargs": {"stage": 1}},
    {"name": "vid_map", "weight": 1.0},
    {"name": "ft", "weight": 200.0, "kwargs": {"init_epochs": 1}},
    {"name": "ab", "weight": 1.0, "kwargs": {"init_epochs": 1}},
]


def _digits_teacher(path: Path) -> Path:
    """A cnn_small (width 8) trained in-process for a few epochs on `digits` (square 8x8 maps, as
    the reference's pooling assumes), saved as a plain state_dict: a brought-in teacher."""
    torch.manual_seed(0)
    ds = build_dataset("digits", "train")
    model = build_encoder("cnn_small", ds.spec("image"), 10, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = ds.get_batch(list(range(len(ds))), ["image"])["inputs"]["image"], torch.as_tensor(ds.labels)
    for _ in range(4):
        for idx in torch.randperm(len(ds)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx])[1], y[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), path)
    return path


def test_every_feature_map_loss_trains_a_student_on_the_online_path(ray_cluster, tmp_path):
    """A cnn_small student on `digits` with a teacher of the same widths (as FSP needs), all seven
    terms at once for 2 epochs: the staged ones switch at epoch 1."""
    ckpt = _digits_teacher(tmp_path / "dig.pt")
    cfg = distill_cfg(tmp_path, **{"data": {"name": "digits"},
                                   "teachers": [{"name": "dig", "arch": "cnn_small", "modality": "image",
                                                 "arch_kwargs": {"width": 8}, "checkpoint": str(ckpt)}],
                                   "distill.teacher_outputs": "online", "distill.teachers": ["dig"], "distill.epochs": 2,
                                   "distill.augment": {"enabled": True, "crop_padding": 1, "flip": False},
                                   "distill.student": {"arch": "cnn_small", "modality": "image", "arch_kwargs": {"width": 8}},
                                   "distill.losses": [{"name": "ce"}, *FEATURE_MAP_LOSSES]})
    res = run_distill(cfg)
    first, last = res.history
    for term in FEATURE_MAP_LOSSES:
        assert math.isfinite(first[f"loss/{term['name']}"]) and math.isfinite(last[f"loss/{term['name']}"]), term
    assert first["loss/fsp"] > 0 and last["loss/fsp"] == 0  # init epoch, then the reference's loss_kd = 0
    assert first["loss/ab"] > 0 and last["loss/ab"] == 0
    assert first["loss/ft"] == 0 and last["loss/ft"] > 0  # the paraphraser epoch, then the factor transfer
    assert first["ft/dig/rec"] > 0 and "ft/dig/rec" not in last
    assert res.final_top1 > 0.15  # above chance (0.1) after 2 short epochs under seven extra terms (0.24 measured)
