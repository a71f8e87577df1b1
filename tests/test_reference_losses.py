"""Losses against the reference implementation's own outputs (RepDistiller at b84f547, run
unchanged in float64 on CPU): tests/fixtures/repdistiller/losses.pt holds each baseline loss's
inputs, value and the gradient w.r.t. each input (None where the reference detaches). Every entry
is replayed through the pure function (``ensemble_kd.losses.functional``) and, where a registered
module computes the same thing, through the module: value and every gradient within 1e-6."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ensemble_kd.losses import DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses import functional as fn
from ensemble_kd.losses.at import at_stages

FIXTURE = Path(__file__).parent / "fixtures" / "repdistiller" / "losses.pt"
TOL = 1e-6
ENTRIES = {"kd_T4", "hint_mse", "cc_correlation", "pkt", "rkd_d25_a50", "at_p2", "sp", "nst", "fsp", "vid"}


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, weights_only=True)


def _leaves(ts):
    return [t.detach().clone().to(torch.float64).requires_grad_(True) for t in ts]


def _close(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    """``got`` equals ``want`` to TOL; a reference gradient of None (detached there) must be
    None or zero here."""
    if want is None:
        assert got is None or float(got.abs().max()) == 0.0, f"{what}: the reference detaches, we do not"
        return
    assert got is not None, f"{what}: no gradient, the reference has one"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = float((got.detach().double() - want.double()).abs().max())
    assert diff <= TOL, f"{what}: max abs difference {diff:.3e}"


def _close_map_grads(g_s: list, g_t: list, want: dict, what: str) -> None:
    """Each student and teacher map leaf's gradient against the reference's (``want["g_s"|"g_t"]``)."""
    for side, leaves in (("g_s", g_s), ("g_t", g_t)):
        for i, (leaf, w) in enumerate(zip(leaves, want[side])):
            _close(leaf.grad, w, f"{what} grad {side}[{i}]")


def test_the_fixture_holds_the_entries_replayed_here(ref):
    assert set(ref) == ENTRIES


# -- pure functions ------------------------------------------------------------------------------
PAIRS = {  # entry -> the function on its (first, second) input
    "kd_T4": ("y_s", "y_t", lambda e: lambda a, b: fn.kd(a, b, e["T"])),
    "hint_mse": ("f_s", "f_t", lambda e: fn.hint),
    "cc_correlation": ("f_s", "f_t", lambda e: fn.cc),
    "pkt": ("f_s", "f_t", lambda e: fn.pkt),
    "rkd_d25_a50": ("f_s", "f_t", lambda e: lambda a, b: fn.rkd(a, b, w_d=25.0, w_a=50.0)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_pair_functions_equal_the_reference(ref, name):
    e = ref[name]
    k_s, k_t, make = PAIRS[name]
    s, t = _leaves([e["inputs"][k_s], e["inputs"][k_t]])
    value = make(e)(s, t)
    assert value.dim() == 0 and value.dtype == torch.float64
    _close(value, torch.as_tensor(e["value"], dtype=torch.float64), f"{name} value")
    value.backward()
    _close(s.grad, e["grad"][k_s], f"{name} grad {k_s}")
    _close(t.grad, e["grad"][k_t], f"{name} grad {k_t}")


def test_rkd_default_weights_are_the_references(ref):
    e = ref["rkd_d25_a50"]
    _close(fn.rkd(e["inputs"]["f_s"], e["inputs"]["f_t"]), torch.as_tensor(e["value"]), "rkd defaults")


@pytest.mark.parametrize("name,func", [("at_p2", lambda a, b: fn.at(a, b, p=2)), ("sp", fn.sp), ("nst", fn.nst)])
def test_map_pair_functions_equal_the_reference_per_stage(ref, name, func):
    """One value per (student map, teacher map) pair; channels differ, stage 0 of the fixture has
    maps of one size, stage 1 too (AT and NST pool a larger map to the smaller: see below)."""
    e = ref[name]
    g_s, g_t = _leaves(e["inputs"]["g_s"]), _leaves(e["inputs"]["g_t"])
    values = [func(a, b) for a, b in zip(g_s, g_t)]
    for i, (got, want) in enumerate(zip(values, e["values_per_stage"])):
        _close(got, torch.as_tensor(want, dtype=torch.float64), f"{name} stage {i}")
    sum(values).backward()
    _close_map_grads(g_s, g_t, e["grad"], name)


def test_fsp_equals_the_reference(ref):
    e = ref["fsp"]
    g_s, g_t = _leaves(e["inputs"]["g_s"]), _leaves(e["inputs"]["g_t"])
    values = fn.fsp(g_s, g_t)
    assert len(values) == len(g_s) - 1 == len(e["values"])
    for i, (got, want) in enumerate(zip(values, e["values"])):
        _close(got, torch.as_tensor(want, dtype=torch.float64), f"fsp pair {i}")
    sum(values).backward()
    _close_map_grads(g_s, g_t, e["grad"], "fsp")
    with pytest.raises(ValueError, match="channels must agree"):
        fn.fsp([g_s[0], g_s[1]], [g_t[0], g_t[2]])


def _vid_regressor(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference VIDLoss's regressor: conv1x1 - ReLU - conv1x1 - ReLU - conv1x1, no biases."""
    h = F.relu(F.conv2d(x, params["regressor.0.weight"]))
    h = F.relu(F.conv2d(h, params["regressor.2.weight"]))
    return F.conv2d(h, params["regressor.4.weight"])


def test_vid_equals_the_reference_after_its_regressor(ref):
    """The fixture's maps are one size (the reference would pool first); softplus(log_scale) +
    eps is the variance, and the reference's init_pred_var = 5 is the variance at init."""
    e = ref["vid"]
    x = e["inputs"]["input"].clone().requires_grad_(True)  # (B, 16, 8, 8) the student's map
    log_scale = e["params"]["log_scale"].clone().requires_grad_(True)  # (32,)
    value = fn.vid(_vid_regressor(x, e["params"]), e["inputs"]["target"], log_scale, eps=e["eps"])
    _close(value, torch.as_tensor(e["value"], dtype=torch.float64), "vid value")
    value.backward()
    _close(x.grad, e["grad"]["input"], "vid grad input")
    _close(log_scale.grad, e["grad"]["log_scale"], "vid grad log_scale")
    _close(fn.vid_variance(e["params"]["log_scale"], e["eps"]), e["pred_var"], "vid pred_var")
    init = torch.full((3,), torch.log(torch.expm1(torch.tensor(e["init_pred_var"] - e["eps"]))).item())
    assert torch.allclose(fn.vid_variance(init, e["eps"]), torch.full((3,), e["init_pred_var"]))


def test_functions_compute_half_precision_in_float32(ref):
    e = ref["kd_T4"]
    got = fn.kd(e["inputs"]["y_s"].half(), e["inputs"]["y_t"].half(), 4.0)
    assert got.dtype == torch.float32 and abs(float(got) - e["value"]) < 1e-2
    with pytest.raises(ValueError, match="hint: the regressed student"):
        fn.hint(torch.zeros(2, 3), torch.zeros(2, 4))


# -- registered modules ----------------------------------------------------------------------------
def _ctx(s_dim: int, t_dims: dict[str, int], B: int, C: int = 10) -> LossContext:
    bank = TeacherBank({}, {}, torch.zeros(B, dtype=torch.int64), torch.arange(B))
    return LossContext(student_dim=s_dim, num_classes=C, teacher_dims=t_dims, bank=bank)


def test_registered_at_module_sums_the_intermediate_stages(ref):
    """The module pairs g[1:-1] of each side (stem and embedding left out, as the reference's
    feature lists are sliced) and sums the per-stage values; gradients as the reference's."""
    e = ref["at_p2"]
    g_s, g_t = _leaves(e["inputs"]["g_s"]), _leaves(e["inputs"]["g_t"])
    B = g_s[0].shape[0]
    stem, emb = torch.randn(B, 4, 8, 8, dtype=torch.float64), torch.randn(B, 6, dtype=torch.float64)
    mod = build_loss("at", _ctx(6, {"t": 6}, B))
    x = DistillInputs(emb, torch.zeros(B, 3, dtype=torch.float64), torch.zeros(B, dtype=torch.int64), torch.arange(B),
                      student_feats=[stem, *g_s, emb], teacher_feats={"t": [stem, *g_t, emb]})
    out = mod(x)
    _close(out.loss, torch.as_tensor(sum(e["values_per_stage"]), dtype=torch.float64), "at module value")
    out.loss.backward()
    _close_map_grads(g_s, g_t, e["grad"], "at module")
    with pytest.raises(ValueError, match="2 intermediate stages, the teacher 1"):
        at_stages([stem, *g_s, emb], [stem, g_t[0], emb])
    with pytest.raises(ValueError, match="the online data path"):
        mod(DistillInputs(emb, torch.zeros(B, 3), torch.zeros(B, dtype=torch.int64), torch.arange(B)))


def _identity(lin: torch.nn.Linear) -> None:
    with torch.no_grad():
        lin.weight.copy_(torch.eye(*lin.weight.shape, dtype=lin.weight.dtype))
        lin.bias.zero_()


def _module_pair(name: str, options: dict, e: dict, k_s: str = "f_s", k_t: str = "f_t", logits: bool = False,
                 setup=None) -> None:
    """Registered loss ``name`` (one teacher) on the entry's pair: value and both gradients."""
    s, t = _leaves([e["inputs"][k_s], e["inputs"][k_t]])
    B = s.shape[0]
    mod = build_loss(name, _ctx(s.shape[1], {"t": t.shape[1]}, B, C=s.shape[1] if logits else 10), **options).double()
    if setup is not None:
        setup(mod)
    zeros = torch.zeros(B, 10, dtype=torch.float64)
    x = (DistillInputs(zeros, s, torch.zeros(B, dtype=torch.int64), torch.arange(B), teacher_logits={"t": t})
         if logits else
         DistillInputs(s, zeros, torch.zeros(B, dtype=torch.int64), torch.arange(B), teacher_emb={"t": t}))
    out = mod(x)
    _close(out.loss, torch.as_tensor(e["value"], dtype=torch.float64), f"{name} module value")
    out.loss.backward()
    _close(s.grad, e["grad"][k_s], f"{name} module grad {k_s}")
    _close(t.grad, e["grad"][k_t], f"{name} module grad {k_t}")


def test_registered_kd_equals_the_reference(ref):
    e = ref["kd_T4"]
    _module_pair("kd", {"temperature": e["T"]}, e, "y_s", "y_t", logits=True)
    _module_pair("kd", {"temperature": e["T"], "reduction": "per_teacher"}, e, "y_s", "y_t", logits=True)


def test_registered_fitnet_with_an_identity_regressor_is_the_reference_hint(ref):
    """The reference's HintLoss is the MSE after the regressor (ConvReg there, Linear here): with
    the regressor set to the identity the module is the hint itself, gradients included."""
    _module_pair("fitnet", {}, ref["hint_mse"], setup=lambda m: _identity(m.regressors["t"]))


def test_registered_cc_equals_the_reference_after_its_heads(ref):
    """The fixture's features are already embedded (the reference's LinearEmbed heads left out):
    ``embed: none`` is the reference's Correlation; identity heads (``both``) give the same."""
    e = ref["cc_correlation"]
    _module_pair("cc", {"embed": "none"}, e)

    def heads(m):
        _identity(m.embed_s["t"])
        _identity(m.embed_t["t"])

    _module_pair("cc", {"embed": "both", "feat_dim": e["inputs"]["f_s"].shape[1]}, e, setup=heads)


def test_registered_pkt_and_rkd_equal_the_reference(ref):
    _module_pair("pkt", {}, ref["pkt"])
    _module_pair("rkd", {}, ref["rkd_d25_a50"])  # defaults w_dist 25, w_angle 50; no teacher gradient


def test_registered_sp_on_flattened_maps_equals_the_reference_per_stage(ref):
    """The module takes (B, d) features; the reference flattens each map (B, C*H*W) first, so the
    module on the flattened maps is the reference's per-stage value and gradient."""
    e = ref["sp"]
    for i, (g_s, g_t) in enumerate(zip(e["inputs"]["g_s"], e["inputs"]["g_t"])):
        B = g_s.shape[0]
        entry = {"inputs": {"f_s": g_s.reshape(B, -1), "f_t": g_t.reshape(B, -1)}, "value": e["values_per_stage"][i],
                 "grad": {"f_s": e["grad"]["g_s"][i].reshape(B, -1), "f_t": e["grad"]["g_t"][i].reshape(B, -1)}}
        _module_pair("sp", {}, entry)


def test_registered_vid_equals_the_reference_per_pixel(ref):
    """A conv1x1 on a map is a Linear on its pixels, and the reference's mean over (B, C, H, W)
    is the element mean over (B*H*W, C) rows: the embedding VID (``channel_reduction: mean``) with
    the reference's regressor shape (conv1x1 - ReLU - conv1x1 - ReLU - conv1x1, no biases; ours is
    a Linear by default: a documented difference) and alpha = log_scale replays the entry,
    gradients w.r.t. the input and log_scale included; at init the variance is init_pred_var."""
    e = ref["vid"]
    x, target, params = e["inputs"]["input"], e["inputs"]["target"], e["params"]
    B, C_s, H, W = x.shape
    C_t = target.shape[1]
    rows = x.permute(0, 2, 3, 1).reshape(-1, C_s).clone().requires_grad_(True)  # (B*H*W, C_s)
    t_rows = target.permute(0, 2, 3, 1).reshape(-1, C_t)  # (B*H*W, C_t)
    mod = build_loss("vid", _ctx(C_s, {"t": C_t}, rows.shape[0]), init_var=e["init_pred_var"], eps=e["eps"],
                     channel_reduction="mean").double()
    head = mod.emb_heads["t"]
    var0 = fn.vid_variance(head.alpha.detach(), e["eps"])
    assert torch.allclose(var0, torch.full_like(var0, e["init_pred_var"]), rtol=1e-6)
    layers = [torch.nn.Linear(C_s, C_t, bias=False), torch.nn.ReLU(), torch.nn.Linear(C_t, C_t, bias=False),
              torch.nn.ReLU(), torch.nn.Linear(C_t, C_t, bias=False)]
    for lin, key in zip(layers[::2], ("regressor.0.weight", "regressor.2.weight", "regressor.4.weight")):
        lin.weight = torch.nn.Parameter(params[key][:, :, 0, 0].clone())
    head.regressor = torch.nn.Sequential(*layers).double()
    with torch.no_grad():
        head.alpha.copy_(params["log_scale"])
    n = rows.shape[0]
    out = mod(DistillInputs(rows, torch.zeros(n, 10, dtype=torch.float64), torch.zeros(n, dtype=torch.int64),
                            torch.arange(n), teacher_emb={"t": t_rows}))
    _close(out.loss, torch.as_tensor(e["value"], dtype=torch.float64), "vid module value")
    out.loss.backward()
    _close(rows.grad.reshape(B, H, W, C_s).permute(0, 3, 1, 2), e["grad"]["input"], "vid module grad input")
    _close(head.alpha.grad, e["grad"]["log_scale"], "vid module grad log_scale")
    _close(out.metrics["vid/t/sigma_emb"], e["pred_var"].sqrt().mean(), "vid module sigma metric")
