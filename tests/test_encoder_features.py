"""forward_features: the stage outputs match RepDistiller's ``is_feat=True, preact=False`` list, and
every registered encoder's features agree with its forward pass (CPU only)."""
from __future__ import annotations

import math

import pytest
import torch

from modalities.encoders import ENCODERS, Encoder, build_encoder
from modalities.spec import ModalitySpec
from tests.helpers import repdistiller_models, repdistiller_state

FIXTURE_ARCHS = ["resnet8x4", "resnet32x4", "resnet20", "resnet56", "wrn_16_2", "wrn_40_2", "vgg8", "vgg13", "MobileNetV2"]
CIFAR = ModalitySpec("image", "image", (3, 32, 32))

# Max abs difference to the reference's float64 logits and embedding. float32: the brief's bound
# (measured: at most 8.7e-5, resnet56, whose logits reach 187, i.e. ~4 float32 ulps of 187; the
# others <= 6e-6). float64: measured <= 9e-14; 1e-10 leaves room for other BLAS orders while still
# failing any real difference (a wrong op changes logits by >= 1e-3).
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# Feature sums and sums of squares, relative. A sum of signed values can be near 0 (MobileNetV2's
# linear bottlenecks), so its error is measured against sqrt(numel * sumsq), the largest |sum| those
# values could have (Cauchy-Schwarz); sumsq is positive and is compared to itself. Measured: <= 1.4e-7
# in float32 (float32 eps is 1.2e-7, accumulated over up to 56 layers) and <= 1e-16 in float64.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _reference_model(arch: str, dtype: torch.dtype) -> Encoder:
    model = build_encoder(arch, CIFAR, 100)
    model.load_state_dict(repdistiller_state(arch))
    return model.to(dtype).eval()


@pytest.mark.parametrize("arch", FIXTURE_ARCHS)
def test_state_dict_keys_and_shapes_are_the_reference(arch: str) -> None:
    ref = repdistiller_models()["archs"][arch]["keys_shapes"]
    ours = [(k, list(v.shape)) for k, v in build_encoder(arch, CIFAR, 100).state_dict().items()]
    assert ours == [(k, list(s)) for k, s in ref]  # same keys, same order, same shapes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("arch", FIXTURE_ARCHS)
def test_outputs_match_the_reference(arch: str, dtype: torch.dtype) -> None:
    fixture = repdistiller_models()
    ref = fixture["archs"][arch]
    with torch.no_grad():
        feats, logits = _reference_model(arch, dtype).forward_features(fixture["input"].to(dtype))  # (4, 3, 32, 32)
    logit_err = (logits.double() - ref["logits"]).abs().max().item()  # (4, 100)
    emb_err = (feats[-1].double() - ref["penultimate"]).abs().max().item()  # (4, embed_dim)
    print(f"{arch} {dtype}: max abs diff logits {logit_err:.2e}, penultimate {emb_err:.2e}")
    assert logit_err <= ATOL[dtype] and emb_err <= ATOL[dtype]
    assert [list(f.shape) for f in feats] == [list(s) for s in ref["feats_shapes"]]
    for i, (f, s, sq) in enumerate(zip(feats, ref["feats_sum"], ref["feats_sumsq"])):
        f = f.double()
        assert abs(f.sum().item() - s) <= RTOL[dtype] * math.sqrt(f.numel() * sq), f"{arch} feature {i}: sum"
        assert abs((f * f).sum().item() - sq) <= RTOL[dtype] * sq, f"{arch} feature {i}: sum of squares"


@pytest.mark.parametrize("arch", ENCODERS.names())
def test_forward_features_agrees_with_forward(arch: str) -> None:
    shape = tuple(ENCODERS.meta(arch)["test_shape"])
    torch.manual_seed(0)
    model = build_encoder(arch, ModalitySpec("x", "image" if len(shape) == 3 else "vector", shape), 7).eval()
    x = torch.randn(2, *shape)  # (B, *shape)
    with torch.no_grad():
        emb, logits = model(x)
        feats, logits_f = model.forward_features(x)
    assert torch.equal(feats[-1], emb) and torch.equal(logits_f, logits)
    assert len(feats) >= 2 and all(f.shape[0] == 2 and torch.isfinite(f).all() for f in feats)
    if len(shape) == 3:  # image encoders: maps (B, C, H, W) first, the embedding (B, D) last
        assert all(f.dim() == 4 for f in feats[:-1]) and feats[-1].shape == (2, model.embed_dim)


def test_mlp_features_are_its_hidden_layers() -> None:
    model = build_encoder("mlp", ModalitySpec("v", "vector", (20,)), 3, hidden=(16, 8, 4), dropout=0.5).eval()
    feats, _ = model.forward_features(torch.randn(5, 20))  # (B, 20)
    assert [tuple(f.shape) for f in feats] == [(5, 16), (5, 8), (5, 4)]
    linear = build_encoder("mlp", ModalitySpec("v", "vector", (20,)), 3, hidden=()).eval()
    feats, _ = linear.forward_features(torch.randn(5, 20))
    assert [tuple(f.shape) for f in feats] == [(5, 20)]  # no hidden layer: the input is the embedding


def test_forward_features_keeps_gradients() -> None:
    """Feature-map losses backpropagate through the stage outputs."""
    model = build_encoder("resnet8", CIFAR, 10).train()
    feats, logits = model.forward_features(torch.randn(2, 3, 32, 32))
    (feats[1].pow(2).mean() + logits.sum()).backward()
    assert model.layer1[0].conv1.weight.grad is not None and model.fc.weight.grad is not None
