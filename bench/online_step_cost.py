"""Cost of one distillation step on the two data paths, as ratios to a CE-only step.

- CE: the student alone (cross-entropy), its input read from the dataset.
- shards: CE + KD + CRD with the teachers' outputs read from Arrow shards (precomputed once; CRD
  `exact` mode, its teacher side projected from the stored embeddings), the stored view replayed.
- online: CE + KD + CRD with the frozen teachers run on a fresh random crop of every batch inside
  the step (CRD `reference` mode: teacher and student memories), what the CIFAR jobs do.

Two settings: `cifar` (resnet32x4 teacher -> resnet8x4 student, 1x32x32 images: scikit-learn's
digits resized to 32, the CIFAR-sized input these archs are built for) and `mlp` (the embedded
default: the three uci-mfeat teachers -> the MLP student on `fou`). Untrained weights: the cost is
the same. One thread (one CPU, as a 1-CPU Ray Train worker); no Ray needed.

    python bench/online_step_cost.py [--setting cifar|mlp|both] [--steps 5] [--batch 64] [--negatives 4096]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_kd.core.config import AugmentConfig, EmbedConfig, ViewsConfig, from_dict  # noqa: E402
from ensemble_kd.training.data import DistillData  # noqa: E402
from ensemble_kd.training.loop import build_module, build_optim  # noqa: E402
from ensemble_kd.training.online_data import OnlineData  # noqa: E402
from ensemble_kd.stages.embed import shard_key, write_shard  # noqa: E402
from ensemble_kd.storage.teacher_checkpoint import load_teacher, save_teacher  # noqa: E402
from ensemble_kd.blocks.views import view_recipe  # noqa: E402
from modalities import build_dataset, build_encoder  # noqa: E402

SETTINGS = {
    "cifar": {"data": {"name": "digits", "kwargs": {"image_size": 32}},
              "teachers": [{"name": "r32x4", "arch": "resnet32x4", "modality": "image"}],
              "student": {"arch": "resnet8x4", "modality": "image"}, "pad": 4},
    "mlp": {"data": {"name": "uci-mfeat"},
            "teachers": [{"name": "pix_cnn", "arch": "cnn_small", "modality": "pix"},
                         {"name": "kar_mlp", "arch": "mlp", "modality": "kar", "arch_kwargs": {"dropout": 0.2}},
                         {"name": "fac_mlp", "arch": "mlp", "modality": "fac", "arch_kwargs": {"dropout": 0.2}}],
            "student": {"arch": "mlp", "modality": "fou", "arch_kwargs": {"hidden": [256, 128]}}, "pad": 2},
}


def _teachers(s: dict, ds, root: Path) -> dict:
    """Untrained teachers saved as ensemble-kd checkpoints and loaded back frozen, as the loop does."""
    out = {}
    for t in s["teachers"]:
        cfg = from_dict({"data": s["data"], "teachers": [t]})
        spec = ds.spec(t["modality"])
        model = build_encoder(t["arch"], spec, ds.num_classes, **t.get("arch_kwargs", {}))
        save_teacher(root / f"{t['name']}.pt", model, cfg.teachers[0], cfg.data, spec, ds.num_classes, {"test_top1": None})
        out[t["name"]] = load_teacher(root / f"{t['name']}.pt", name=t["name"])
    return out


def _shards(teachers: dict, ds, root: Path, pad: int) -> dict[str, str]:
    ecfg = EmbedConfig(batch_size=256, views=ViewsConfig(num_views=1, crop_padding=pad))
    dirs = {}
    for name, t in teachers.items():
        key = shard_key(name, t.content_hash, ds, ds.fingerprint(), view_recipe(ecfg.views), "float32")
        for _ in write_shard(t, ds, key, root, ecfg, torch.device("cpu"), amp=False):
            pass  # rows done, then the manifest
        dirs[name] = str(root / key.dirname)
    return dirs


def _step_ms(cfg, data, ds, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    module = build_module(cfg, data, ds.num_classes, torch.device("cpu"))
    opt, _, _ = build_optim(cfg, [p for p in module.parameters() if p.requires_grad])
    g = torch.Generator().manual_seed(1)

    def step(i: int) -> None:
        rows = torch.randperm(len(data), generator=g)[:batch]
        parts = module(data.batch(rows, torch.device("cpu"), 0, i), 0, i)
        loss = sum(module.weights[n] * out.loss for n, out in parts.items())
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(0)  # warm-up (CRD fixes Z on its first batch)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return 1000 * (time.perf_counter() - t0) / steps


def measure(name: str, steps: int, batch: int, negatives: int) -> dict:
    s = SETTINGS[name]
    ds = build_dataset(s["data"]["name"], "train", **s["data"].get("kwargs", {}))
    names = [t["name"] for t in s["teachers"]]

    def cfg(losses, path="shards"):
        return from_dict({"data": s["data"], "teachers": s["teachers"],
                          "distill": {"teachers": names if len(losses) > 1 else [], "student": s["student"], "losses": losses,
                                      "teacher_outputs": path, "augment": {"crop_padding": s["pad"]}}})

    kd = {"name": "kd", "kwargs": {"temperature": 4.0}}
    crd = lambda mode: {"name": "crd", "weight": 0.8, "kwargs": {"num_negatives": negatives, "mode": mode}}  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="ekd-bench-") as tmp:
        teachers = _teachers(s, ds, Path(tmp))
        shards = _shards(teachers, ds, Path(tmp), s["pad"])
        ce = _step_ms(cfg([{"name": "ce"}]), DistillData(ds, s["student"]["modality"]), ds, batch, steps)
        sh = _step_ms(cfg([{"name": "ce"}, kd, crd("exact")]), DistillData(ds, s["student"]["modality"], shards), ds, batch, steps)
        on_data = OnlineData(ds, s["student"]["modality"], teachers, AugmentConfig(crop_padding=s["pad"]), seed=0)
        on = _step_ms(cfg([{"name": "ce"}, kd, crd("reference")], "online"), on_data, ds, batch, steps)
    return {"setting": name, "teachers": names, "student": s["student"]["arch"], "batch": batch, "negatives": negatives,
            "ce_ms": round(ce, 2), "shards_ce_kd_crd_ms": round(sh, 2), "online_ce_kd_crd_ms": round(on, 2),
            "ratio_shards_over_ce": round(sh / ce, 3), "ratio_online_over_ce": round(on / ce, 3),
            "ratio_online_over_shards": round(on / sh, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["cifar", "mlp", "both"], default="both")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--negatives", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ["cifar", "mlp"] if args.setting == "both" else [args.setting]
    print(json.dumps([measure(n, args.steps, args.batch, args.negatives) for n in names], indent=2))


if __name__ == "__main__":
    main()
