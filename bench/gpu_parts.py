"""GPU check of the parts that need no Ray: the data store's batches on the device, the shard path's
CE + KD + CRD steps under bf16 autocast, and the CRD momentum memory, each against the same on CPU.

``bench/gpu_smoke.py`` runs the whole pipeline on a GPU (teachers and the embed stage as Ray tasks,
both distill paths, faiss-gpu); it needs Ray, MLflow and FAISS on the GPU machine. This script needs
only torch, pyarrow and pydantic, so it also runs on an accelerator machine that cannot install the
rest (an offline box where Ray's wheel does not fit what can be carried there). Parts:

  store     the embedded default's train split written to the data store and read back as batches
            moved to the device (pinned host memory, non_blocking), against the source's tensors
  shards    a teacher (``mlp`` on ``kar``, seeded random weights) run on the device under autocast
            over every train row, written as a shard with ``ShardWriter`` and read back by
            ``DistillData``: the bank the losses see
  steps     for CE + KD, CE + KD + CRD (exact, shared negatives) and CE + KD + CRD (reference,
            per-sample negatives): ``--steps`` SGD steps of a student ``mlp`` on ``fou`` from the same
            seed on the device (bf16 autocast, as ``amp: true`` does) and on the CPU (float32):
            every loss finite, the first step's loss on both (relative difference: bf16 rounding
            only), the mean step time on each
  memory    ``MomentumMemory`` updates with the same rows and values on the device and on the CPU:
            the largest difference of the tables
  cifar     with ``--cifar-rows R``: a ``resnet32x4`` teacher's shard of R synthetic 3x32x32 images
            (100 classes), then CE + KD + CRD (exact, N = 16384 shared) steps of a ``resnet8x4``
            student on the device (bf16) and on the CPU (float32): a model of the CIFAR-100 jobs' size

The step is the loop's (``loop.DistillModule.forward`` then ``sum(weight * loss)``, backward, SGD),
written out here because ``ensemble_kd.training.loop`` imports Ray.

    python bench/gpu_parts.py [--device cuda|cpu] [--steps 30] [--cifar-rows 20000]

Prints one JSON document. ``--device cpu`` compares the CPU with itself (the suite's smoke test).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_kd.core.files import state_dict_hash  # noqa: E402
from ensemble_kd.core.config import AdversarialConfig, DataConfig, ViewsConfig  # noqa: E402
from ensemble_kd.training.data import DistillData, epoch_rows  # noqa: E402
from ensemble_kd.storage.datastore import prepare  # noqa: E402
from ensemble_kd.core.devices import autocast  # noqa: E402
from ensemble_kd.losses import DistillInputs, LossContext, build_loss  # noqa: E402
from ensemble_kd.blocks.memory import MomentumMemory  # noqa: E402
from ensemble_kd.storage.shards import ShardKey, ShardWriter  # noqa: E402
from ensemble_kd.blocks.views import view_recipe  # noqa: E402
from modalities import build_dataset, build_encoder  # noqa: E402

CRD = {"feat_dim": 128, "tau": 0.07, "num_negatives": 4096, "momentum": 0.5}
ARMS = {
    "ce+kd": [("ce", 1.0, {}), ("kd", 1.0, {"temperature": 4.0})],
    "ce+kd+crd_exact_shared": [("ce", 1.0, {}), ("kd", 1.0, {"temperature": 4.0}),
                               ("crd", 0.8, {**CRD, "mode": "exact", "per_sample": False})],
    "ce+kd+crd_reference_per_sample": [("ce", 1.0, {}), ("kd", 1.0, {"temperature": 4.0}),
                                       ("crd", 0.8, {**CRD, "mode": "reference", "per_sample": True})],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_store(out: Path, device: torch.device) -> dict[str, Any]:
    ds = prepare(DataConfig(), "train", out)
    src = build_dataset("uci-mfeat", "train")
    rows = np.random.default_rng(0).permutation(len(ds))[:512]
    got = ds.get_batch(rows)["inputs"]
    want = src.get_batch(rows)["inputs"]
    same = all(torch.equal(got[m], want[m]) for m in want)
    x = got["pix"].pin_memory() if device.type == "cuda" else got["pix"]
    on_dev = x.to(device, non_blocking=True)
    _sync(device)
    return {"rows": len(ds), "equal_to_source": same, "pix_on_device": str(on_dev.device),
            "round_trip_equal": torch.equal(on_dev.cpu(), got["pix"])}


@torch.no_grad()
def part_shards(out: Path, device: torch.device) -> tuple[DistillData, dict[str, Any]]:
    ds = prepare(DataConfig(), "train", out)
    torch.manual_seed(0)
    teacher = build_encoder("mlp", ds.spec("kar"), ds.num_classes).to(device).eval()
    key = ShardKey("kar_t", state_dict_hash(teacher.state_dict()), ds.name, "train", ds.fingerprint(),
                   view_recipe(ViewsConfig(), AdversarialConfig()), "float32")
    t0 = time.perf_counter()
    with ShardWriter(out / "shards", key, teacher.embed_dim, ds.num_classes) as w:
        for s in range(0, len(ds), 512):
            b = ds.get_batch(np.arange(s, min(s + 512, len(ds))), ["kar"])
            with autocast(device, True):
                emb, logits = teacher(b["inputs"]["kar"].to(device))  # (B, d), (B, C)
            n = len(b["sample_id"])
            zeros = np.zeros(n, dtype=np.int16)
            w.write(b["sample_id"].numpy(), b["label"].numpy(), np.zeros(n, dtype=np.int32), zeros, zeros,
                    np.zeros(n, dtype=bool), emb.float().cpu().numpy(), logits.float().cpu().numpy())
        manifest = w.close(num_samples=len(ds), dataset_name=ds.name)
    _sync(device)
    data = DistillData(ds, "fou", {"kar_t": out / "shards" / key.dirname})
    emb = data.bank.embeddings["kar_t"]
    return data, {"rows": manifest["num_rows"], "seconds": round(time.perf_counter() - t0, 3),
                  "finite": bool(torch.isfinite(emb.float()).all()), "embed_dim": int(emb.shape[1])}


def _run_arm(data: DistillData, terms, device: torch.device, amp: bool, steps: int, arch: str = "mlp") -> dict[str, Any]:
    torch.manual_seed(0)
    classes = data.ds.num_classes
    student = build_encoder(arch, data.spec, classes).to(device)
    ctx = LossContext(student_dim=student.embed_dim, num_classes=classes, teacher_dims=data.teacher_dims, bank=data.bank,
                      seed=0, device=device)
    losses = {name: build_loss(name, ctx, **kw) for name, _, kw in terms}
    weights = {name: w for name, w, _ in terms}
    params = [*student.parameters(), *(p for m in losses.values() for p in m.parameters())]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    batches = epoch_rows(len(data), 64, 1, 0, 0, 0)
    first, times, finite = None, [], True
    for i in range(steps):
        t0 = time.perf_counter()
        batch = data.batch(batches[i % len(batches)], device, 0, i)
        with autocast(device, amp):
            emb, logits = student(batch["x"])  # (B, d_s), (B, C)
            x = DistillInputs(emb, logits, batch["labels"], batch["index"], batch["teacher_emb"], batch["teacher_logits"],
                              epoch=0, step=i)
            parts = {n: m(x) for n, m in losses.items()}
        loss = sum(weights[n] * out.loss.float() for n, out in parts.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        finite &= bool(torch.isfinite(loss.detach()))
        if first is None:
            first = float(loss.detach())
    warm = times[min(3, len(times) - 1):]
    return {"first_loss": first, "last_loss": float(loss.detach()), "finite": finite, "step_ms": round(1000 * float(np.mean(warm)), 3)}


def part_steps(data: DistillData, device: torch.device, steps: int) -> dict[str, Any]:
    out = {}
    for arm, terms in ARMS.items():
        dev = _run_arm(data, terms, device, amp=True, steps=steps)
        cpu = _run_arm(data, terms, torch.device("cpu"), amp=False, steps=steps)
        out[arm] = {"device": dev, "cpu": cpu,
                    "first_loss_rel_diff": round(abs(dev["first_loss"] - cpu["first_loss"]) / abs(cpu["first_loss"]), 5),
                    "cpu_over_device": round(cpu["step_ms"] / dev["step_ms"], 2)}
    return out


@torch.no_grad()
def _teacher_shard(out: Path, ds, modality: str, arch: str, device: torch.device, name: str) -> Path:
    """A teacher ``arch`` on ``modality`` (seeded random weights) run on ``device`` under autocast over
    every row of ``ds``, written as a one-view shard; its folder."""
    torch.manual_seed(0)
    teacher = build_encoder(arch, ds.spec(modality), ds.num_classes).to(device).eval()
    key = ShardKey(name, state_dict_hash(teacher.state_dict()), ds.name, ds.split, ds.fingerprint(),
                   view_recipe(ViewsConfig(), AdversarialConfig()), "float32")
    with ShardWriter(out / "shards", key, teacher.embed_dim, ds.num_classes) as w:
        for s in range(0, len(ds), 256):
            b = ds.get_batch(np.arange(s, min(s + 256, len(ds))), [modality])
            with autocast(device, True):
                emb, logits = teacher(b["inputs"][modality].to(device))  # (B, d), (B, C)
            n = len(b["sample_id"])
            zeros = np.zeros(n, dtype=np.int16)
            w.write(b["sample_id"].numpy(), b["label"].numpy(), np.zeros(n, dtype=np.int32), zeros, zeros,
                    np.zeros(n, dtype=bool), emb.float().cpu().numpy(), logits.float().cpu().numpy())
        w.close(num_samples=len(ds), dataset_name=ds.name)
    return out / "shards" / key.dirname


def part_cifar(out: Path, device: torch.device, steps: int, rows: int) -> dict[str, Any]:
    """CIFAR-sized: a ``resnet32x4`` teacher's shard of ``rows`` 3x32x32 images (``synthetic``), then
    CE + KD + CRD steps of a ``resnet8x4`` student (CRD N = 16384 shared, as the CIFAR-100 jobs),
    on the device under bf16 and on the CPU in float32."""
    data_cfg = DataConfig(name="synthetic", kwargs={"rows": rows, "classes": 100, "modalities": {"img": [3, 32, 32]},
                                                    "seed": 0, "normalize": True})
    ds = prepare(data_cfg, "train", out)
    t0 = time.perf_counter()
    shard = _teacher_shard(out, ds, "img", "resnet32x4", device, "r32x4")
    _sync(device)
    embed_s = time.perf_counter() - t0
    data = DistillData(ds, "img", {"r32x4": shard})
    terms = [("ce", 1.0, {}), ("kd", 1.0, {"temperature": 4.0}),
             ("crd", 0.8, {**CRD, "num_negatives": 16384, "mode": "exact", "per_sample": False})]
    dev = _run_arm(data, terms, device, amp=True, steps=steps, arch="resnet8x4")
    cpu = _run_arm(data, terms, torch.device("cpu"), amp=False, steps=max(4, steps // 5), arch="resnet8x4")
    return {"rows": len(ds), "teacher_embed_rows_per_s": round(len(ds) / embed_s, 1), "device": dev, "cpu": cpu,
            "first_loss_rel_diff": round(abs(dev["first_loss"] - cpu["first_loss"]) / abs(cpu["first_loss"]), 5),
            "cpu_over_device": round(cpu["step_ms"] / dev["step_ms"], 2)}


def part_memory(device: torch.device) -> dict[str, Any]:
    mems = {d: MomentumMemory(20_000, 128, momentum=0.5, seed=3).to(d) for d in ("cpu", str(device))}
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        rows = torch.randperm(20_000, generator=g)[:256]
        vals = torch.randn(256, 128, generator=g)
        for d, m in mems.items():
            m.update(rows.to(d), vals.to(d))
    diff = (mems["cpu"].table().cpu() - mems[str(device)].table().cpu()).abs().max()
    return {"max_abs_diff": float(diff)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cifar-rows", type=int, default=0, help="also the CIFAR-sized part on this many images (0: skip)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"device": "cuda", "status": "skipped: no CUDA device"}))
        return
    device = torch.device(args.device)
    res: dict[str, Any] = {"device": args.device, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    with tempfile.TemporaryDirectory(prefix="ekd-gpu-parts-") as tmp:
        out = Path(tmp)
        res["store"] = part_store(out, device)
        data, res["shards"] = part_shards(out, device)
        res["steps"] = part_steps(data, device, args.steps)
        res["memory"] = part_memory(device)
        if args.cifar_rows:
            res["cifar"] = part_cifar(out, device, args.steps, args.cifar_rows)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
