"""Bring-your-own teacher weights: RepDistiller checkpoints and plain state_dicts load through
load_teacher / inspect_teacher, give the reference's logits, and every bad file is one clear error
naming the file (CPU only; no training, no Ray)."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest
import torch

from ensemble_kd.core.config import DataConfig, TeacherConfig
from ensemble_kd.storage.teacher_checkpoint import CheckpointError, inspect_teacher, load_teacher, save_teacher
from modalities import ModalitySpec, build_encoder
from tests.helpers import repdistiller_models, repdistiller_state

FIXTURE_ARCHS = ["resnet8x4", "resnet32x4", "resnet20", "resnet56", "wrn_16_2", "wrn_40_2", "vgg8", "vgg13", "MobileNetV2"]
CIFAR = ModalitySpec("image", "image", (3, 32, 32))
FOREIGN = dict(spec=CIFAR, num_classes=100)


def _repdistiller_file(path: Path, state: dict[str, torch.Tensor], accuracy: float = 73.5) -> Path:
    """A checkpoint as RepDistiller's train_teacher.py writes it (accuracy a tensor, plus the optimiser)."""
    opt = {"state": {}, "param_groups": [{"lr": 0.05, "momentum": 0.9, "params": [0, 1]}]}
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(accuracy), "optimizer": opt}, path)
    return path


def _files(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


@pytest.mark.parametrize("arch", FIXTURE_ARCHS)
def test_foreign_files_give_the_reference_logits(arch: str, tmp_path: Path) -> None:
    fixture = repdistiller_models()
    ref = fixture["archs"][arch]
    state = repdistiller_state(arch)
    files = {"repdistiller": _repdistiller_file(tmp_path / "ckpt_epoch_240.pth", state), "state_dict": tmp_path / "w.pt"}
    torch.save(state, files["state_dict"])
    for fmt, path in files.items():
        t = load_teacher(path, arch=arch, **FOREIGN)
        with torch.no_grad():
            emb, logits = t.model(fixture["input"].float())  # (4, 3, 32, 32) in float32
        err = (logits.double() - ref["logits"]).abs().max().item()
        print(f"{arch} via {fmt}: max abs logit diff {err:.2e} (float32)")
        assert err <= 1e-4 and (emb.double() - ref["penultimate"]).abs().max().item() <= 1e-4
        assert t.format == fmt and t.arch == arch and t.modality == "image" and t.num_classes == 100
        assert t.content_hash == hashlib.sha256(path.read_bytes()).hexdigest() and t.test_top1 is None
        assert t.reported_accuracy == (pytest.approx(73.5) if fmt == "repdistiller" else None)
        assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    assert load_teacher(files["repdistiller"], arch=arch, **FOREIGN).content_hash != t.content_hash


def test_inspect_teacher_describes_without_loading(tmp_path: Path) -> None:
    path = _repdistiller_file(tmp_path / "r.pth", repdistiller_state("wrn_16_2"), accuracy=75.61)
    got = inspect_teacher(path, arch="wrn_16_2", **FOREIGN)
    assert got == {"format": "repdistiller", "arch": "wrn_16_2", "modality": "image", "num_classes": 100,
                   "content_hash": hashlib.sha256(path.read_bytes()).hexdigest(), "test_top1": None,
                   "reported_accuracy": pytest.approx(75.61), "dataset": None}
    with pytest.raises(CheckpointError, match=r"r\.pth: weights do not fit encoder 'wrn_40_2'"):
        inspect_teacher(path, arch="wrn_40_2", **FOREIGN)  # the fit is checked, on the meta device


def _ours(path: Path) -> Path:
    """An ensemble-kd teacher checkpoint of a resnet8 on CIFAR-shaped images."""
    model = build_encoder("resnet8", CIFAR, 10)
    save_teacher(path, model, TeacherConfig(name="r8", arch="resnet8", modality="image"), DataConfig(name="cifar10"),
                 CIFAR, 10, {"test_top1": 0.5})
    return path


def test_ensemble_kd_files_load_as_before_and_check_what_is_given(tmp_path: Path) -> None:
    path = _ours(tmp_path / "r8.pt")
    t = load_teacher(path, arch="resnet8", modality="image", spec=CIFAR, num_classes=10)
    assert t.format == "ensemble-kd" and t.name == "r8" and t.test_top1 == 0.5 and t.dataset == "cifar10"
    assert inspect_teacher(path)["content_hash"] == t.content_hash == load_teacher(path).content_hash
    with pytest.raises(CheckpointError, match=r"r8\.pt is an ensemble-kd teacher checkpoint with arch 'resnet8', but arch 'resnet20'"):
        load_teacher(path, arch="resnet20")
    with pytest.raises(CheckpointError, match=r"r8\.pt .* modality 'image', but modality 'pix'"):
        load_teacher(path, modality="pix")
    with pytest.raises(CheckpointError, match=r"r8\.pt .* num_classes 10, but num_classes 100"):
        inspect_teacher(path, num_classes=100)


def _bad_files(d: Path) -> dict[str, tuple[Path, dict, str]]:
    """name -> (file, load_teacher arguments, what the error must say)."""
    state = repdistiller_state("resnet8x4")
    torch.save(state, d / "resnet8x4.pt")
    data = (d / "resnet8x4.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({**state, "extra.weight": torch.zeros(3)}, d / "extra.pt")
    _repdistiller_file(d / "missing.pth", {k: v for k, v in state.items() if k != "fc.bias"})
    torch.save({"epoch": 1, "model": state, "opt": argparse.Namespace(lr=0.05)}, d / "code.pth")
    torch.save([state], d / "list.pt")
    _ours(d / "ours.pt")
    r8x4 = dict(arch="resnet8x4", **FOREIGN)
    return {
        "other arch": (d / "resnet8x4.pt", dict(arch="resnet32x4", **FOREIGN),
                       r"resnet8x4\.pt: weights do not fit encoder 'resnet32x4' .* missing keys \(144\): 'layer1\.1\.conv1\.weight'"),
        "other num_classes": (d / "resnet8x4.pt", dict(arch="resnet8x4", spec=CIFAR, num_classes=10),
                              r"resnet8x4\.pt: .* shape mismatch at 'fc\.weight': the file has \[100, 256\], the encoder needs \[10, 256\]"),
        "truncated": (d / "cut.pt", r8x4, r"cut\.pt is unreadable \(truncated or not a torch file\)"),
        "extra key": (d / "extra.pt", r8x4, r"extra\.pt: weights do not fit .* unexpected keys \(1\): 'extra\.weight'"),
        "missing key": (d / "missing.pth", r8x4, r"missing\.pth: weights do not fit .* missing keys \(1\): 'fc\.bias'"),
        "needs code": (d / "code.pth", r8x4, r"code\.pth needs code execution to load \(it pickles argparse\.Namespace\) and is refused"),
        "not weights": (d / "list.pt", r8x4, r"list\.pt is not a teacher file this loader knows: .* it holds a list"),
        "no arch": (d / "resnet8x4.pt", dict(spec=CIFAR), r"resnet8x4\.pt is a plain state_dict, which records no architecture: give arch, num_classes"),
        "ours, other arch": (d / "ours.pt", dict(arch="resnet8x4"),
                             r"ours\.pt is an ensemble-kd teacher checkpoint with arch 'resnet8', but arch 'resnet8x4' was given"),
        "unknown arch": (d / "resnet8x4.pt", dict(arch="resnet99", **FOREIGN),
                         r"resnet8x4\.pt: cannot build encoder 'resnet99' for it: unknown encoder 'resnet99'"),
        "not found": (d / "nope.pt", r8x4, r"not found: .*nope\.pt"),
    }


def test_bad_files_are_one_clear_error_naming_the_file(tmp_path: Path) -> None:
    cases = _bad_files(tmp_path)
    before = _files(tmp_path)
    for what, (path, kwargs, message) in cases.items():
        for call in (load_teacher, inspect_teacher):
            with pytest.raises(CheckpointError, match=message) as err:
                call(path, **kwargs)
            assert "\n" not in str(err.value), what  # one line, not torch's page of advice
    assert _files(tmp_path) == before  # nothing written, nothing touched


def test_dataparallel_prefix_is_named(tmp_path: Path) -> None:
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in repdistiller_state("vgg8").items()}, path)
    with pytest.raises(CheckpointError, match=r"dp\.pt: .*'module\.' prefix: save model\.module\.state_dict\(\) instead"):
        load_teacher(path, arch="vgg8", **FOREIGN)


def test_old_format_files_load_and_cut_ones_are_unreadable(tmp_path: Path) -> None:
    """RepDistiller's published teachers predate torch 1.6's zip format; a cut old-format file can
    stop inside a pickled name, which must read as truncated, not as a file that needs code."""
    path = tmp_path / "old.pth"
    torch.save({"epoch": 240, "model": repdistiller_state("resnet20"), "accuracy": 69.1}, path,
               _use_new_zipfile_serialization=False)
    t = load_teacher(path, arch="resnet20", **FOREIGN)
    assert t.format == "repdistiller" and t.reported_accuracy == pytest.approx(69.1)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    for n in range(0, 600, 3):  # every cut through the pickle's header and names
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=r"cut\.pth is unreadable \(truncated or not a torch file\)"):
            load_teacher(cut, arch="resnet20", **FOREIGN)
