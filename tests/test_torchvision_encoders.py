"""torchvision classification models as encoders (``torchvision/<name>``): torchvision's own keys
and logits, features checked against torchvision's FX feature extractor, a saved torchvision
state_dict loads as a teacher (CPU only, 3x32x32 inputs, weights never downloaded)."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import get_model
from torchvision.models.feature_extraction import create_feature_extractor

from ensemble_kd.cli import main
from ensemble_kd.storage.teacher_checkpoint import load_teacher
from modalities import ModalitySpec, build_encoder, list_encoders
from modalities.encoders.torchvision_models import TorchvisionResNet
from modalities.registry import UnknownNameError

NAMES = [n for n in list_encoders("image") if n.startswith("torchvision/")]
IMAGES = ModalitySpec("image", "image", (3, 32, 32))


def _pair(arch: str, num_classes: int = 5) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(our encoder, torchvision's model) holding the same weights, in eval mode."""
    torch.manual_seed(0)
    ours = build_encoder(arch, IMAGES, num_classes).eval()
    tv = get_model(arch.split("/", 1)[1], weights=None, num_classes=num_classes).eval()
    tv.load_state_dict(ours.state_dict())
    return ours, tv


def test_the_usual_models_are_registered() -> None:
    assert {"torchvision/resnet18", "torchvision/resnet34", "torchvision/resnet50", "torchvision/mobilenet_v2",
            "torchvision/mobilenet_v3_small", "torchvision/efficientnet_b0"} <= set(NAMES)


@pytest.mark.parametrize("arch", NAMES)
def test_keys_logits_and_features_are_torchvisions(arch: str) -> None:
    ours, tv = _pair(arch)
    assert list(ours.state_dict()) == list(tv.state_dict())  # same keys, same order
    x = torch.randn(2, 3, 32, 32)  # (B, C, H, W)
    with torch.no_grad():
        feats, logits = ours.forward_features(x)
        assert torch.equal(logits, tv(x))
        # the same stage outputs, taken by torchvision's own FX extractor from its unchanged model
        nodes = _nodes(ours, feats)
        got = create_feature_extractor(tv, return_nodes=nodes)(x)
    for i, node in enumerate(nodes):
        assert torch.equal(got[node], feats[i]), f"{arch}: feature {i} ({node})"


def _nodes(ours: torch.nn.Module, feats: list[torch.Tensor]) -> list[str]:
    """torchvision graph nodes for our stage outputs and the embedding."""
    if isinstance(ours, TorchvisionResNet):
        return ["relu", "layer1", "layer2", "layer3", "layer4", "flatten"]
    nodes = [f"features.{i}" for i in sorted(ours._stage_ends)]
    last = ours._split - 1  # the embedding: the output of the classifier's last layer before the dropout
    return nodes + ["flatten" if last < 0 else f"classifier.{last}"]


def test_a_saved_torchvision_state_dict_loads_as_a_teacher(tmp_path) -> None:
    torch.manual_seed(1)
    tv = get_model("resnet18", weights=None, num_classes=10).eval()
    path = tmp_path / "resnet18_mine.pth"
    torch.save(tv.state_dict(), path)
    t = load_teacher(path, arch="torchvision/resnet18", spec=IMAGES, num_classes=10)
    assert t.format == "state_dict" and list(t.model.state_dict()) == list(tv.state_dict())
    x = torch.randn(4, 3, 32, 32)  # (B, C, H, W)
    with torch.no_grad():
        emb, logits = t.model(x)
        torch.testing.assert_close(logits, tv(x), rtol=0, atol=0)
    assert emb.shape == (4, 512)


def test_unknown_names_and_channel_counts_are_refused() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown encoder 'torchvision/resnet19'. Did you mean 'torchvision/resnet18'"):
        build_encoder("torchvision/resnet19", IMAGES, 10)
    with pytest.raises(ValueError, match=r"'torchvision/resnet18' takes 3-channel images, but modality 'pix' has shape \(1, 28, 28\)"):
        build_encoder("torchvision/resnet18", ModalitySpec("pix", "image", (1, 28, 28)), 10)
    with pytest.raises(ValueError, match="never downloaded"):
        build_encoder("torchvision/resnet18", IMAGES, 10, weights="IMAGENET1K_V1")


def test_cli_lists_them(capsys) -> None:
    assert main(["list", "encoders"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES) and '"family": "torchvision"' in out
