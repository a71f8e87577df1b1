"""Registry-wide checks of the encoder zoo (CPU only, B=2, small inputs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import modalities.encoders  # noqa: F401  (registers every encoder)
from modalities.registry import UnknownNameError
from modalities.encoders import ENCODERS, Encoder, build_encoder, list_encoders
from modalities.spec import ModalitySpec

NUM_CLASSES = 7
ALL = ENCODERS.names()
IMAGE = list_encoders("image")


def _spec(shape: tuple[int, ...], name: str = "x") -> ModalitySpec:
    return ModalitySpec(name, "image" if len(shape) == 3 else "vector", tuple(shape))


def _build(arch: str, shape: tuple[int, ...] | None = None, num_classes: int = NUM_CLASSES) -> Encoder:
    torch.manual_seed(0)
    shape = tuple(shape or ENCODERS.meta(arch)["test_shape"])
    return build_encoder(arch, _spec(shape), num_classes)


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def test_zoo_is_registered() -> None:
    want = {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
        "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
        "vgg19", "MobileNetV2", "cnn_small", "cnn_medium", "mlp", "mlp_wide", "torchvision/resnet18",
        "torchvision/resnet34", "torchvision/resnet50", "torchvision/mobilenet_v2", "torchvision/mobilenet_v3_small",
        "torchvision/efficientnet_b0",
    }  # fmt: skip
    assert want <= set(ALL)
    for name in ALL:
        meta = ENCODERS.meta(name)
        assert set(meta["input_kinds"]) <= {"image", "vector"} and meta["input_kinds"]
        kind = "image" if len(meta["test_shape"]) == 3 else "vector"
        assert kind in meta["input_kinds"], name


@pytest.mark.parametrize("arch", ALL)
def test_forward_shapes(arch: str) -> None:
    model = _build(arch).eval()
    x = torch.randn(2, *ENCODERS.meta(arch)["test_shape"])  # (B, *shape)
    with torch.no_grad():
        emb, logits = model(x)
    assert isinstance(model, Encoder) and model.num_classes == NUM_CLASSES
    assert emb.shape == (2, model.embed_dim) and logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(emb).all() and torch.isfinite(logits).all()
    # the embedding is the classifier's input: logits come from it, in the same forward
    torch.testing.assert_close(_last_linear(model)(emb), logits)


@pytest.mark.parametrize("arch", ALL)
def test_backward_reaches_every_parameter(arch: str) -> None:
    model = _build(arch).train()
    x = torch.randn(2, *ENCODERS.meta(arch)["test_shape"])  # (B, *shape)
    emb, logits = model(x)
    (logits.sum() + emb.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{arch}: non-finite gradient for {name}"


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 15)], ids=["1x8x8", "3x16x15"])
@pytest.mark.parametrize("arch", IMAGE)
def test_image_encoders_take_small_inputs(arch: str, shape: tuple[int, int, int]) -> None:
    shape = (ENCODERS.meta(arch).get("in_channels", shape[0]), *shape[1:])  # torchvision's: 3 channels only
    model = _build(arch, shape).train()  # train mode: BatchNorm must cope with 1x1 maps at B=2
    emb, logits = model(torch.randn(2, *shape))  # (B, C, H, W)
    assert emb.shape == (2, model.embed_dim) and logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(emb).all() and torch.isfinite(logits).all()


def test_mlp_flattens_images_and_takes_kwargs() -> None:
    model = build_encoder("mlp", _spec((1, 4, 5)), 3, hidden=(16,), dropout=0.5)
    emb, logits = model(torch.randn(2, 1, 4, 5))  # (B, C, H, W) -> (B, 20)
    assert model.embed_dim == 16 and emb.shape == (2, 16) and logits.shape == (2, 3)
    assert any(isinstance(m, nn.Dropout) for m in model.modules())


def test_width_kwargs() -> None:
    assert build_encoder("cnn_small", _spec((1, 8, 8)), 3, width=4).embed_dim == 16
    assert build_encoder("MobileNetV2", _spec((3, 32, 32)), 3, width_mult=1.0).embed_dim == 1280


def test_unknown_encoder_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        build_encoder("resnet99", _spec((3, 32, 32)), 10)
    msg = str(err.value)
    assert "resnet99" in msg and "resnet8x4" in msg and "wrn_40_2" in msg and "mlp" in msg


def test_image_encoder_on_vector_modality_is_rejected() -> None:
    with pytest.raises(ValueError, match="fou") as err:
        build_encoder("resnet20", ModalitySpec("fou", "vector", (76,)), 10)
    msg = str(err.value)
    assert "resnet20" in msg and "vector" in msg and "mlp" in msg  # names the fix


# Parameter counts with 100 classes on CIFAR inputs, as published in the CRD/RepDistiller line of
# work (Tian et al. 2020 and the KD papers that reuse its zoo), in millions.
PUBLISHED_PARAMS_M = {
    "resnet32x4": 7.43,
    "resnet8x4": 1.23,
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
    "vgg13": 9.46,
    "vgg8": 3.96,
    "resnet56": 0.86,
    "MobileNetV2": 0.81,
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMS_M))
def test_parameter_counts_match_published(arch: str) -> None:
    model = build_encoder(arch, _spec((3, 32, 32)), 100)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(PUBLISHED_PARAMS_M[arch], rel=0.03), f"{arch}: {n:.3f}M params"
