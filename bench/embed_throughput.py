"""Embed-stage throughput: the embed stage's Ray task against a bare single-process torch loop.

Same teacher, same data, same views, one core each (the task reserves 1 CPU and runs torch
on 1 thread; the bare loop runs on 1 thread). Reports rows/s of both and their ratio, both
end to end (the task's start, teacher and dataset load, shard write included) and in steady
state (from the task's first finished batch to its last). Target: ratio >= 0.8 per core used.

    python bench/embed_throughput.py                  # mnist-5k train, cnn_medium, 8 views (32k rows)
    python bench/embed_throughput.py --views 2 --arch cnn_small
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_kd.core.config import from_dict, to_dict  # noqa: E402
from ensemble_kd.core.raycluster import ray_session  # noqa: E402
from ensemble_kd.stages.embed import embed_rows, embed_task, plan_shards  # noqa: E402
from ensemble_kd.stages.teachers import existing  # noqa: E402
from ensemble_kd.storage.teacher_checkpoint import load_teacher, save_teacher  # noqa: E402
from modalities import build_dataset, build_encoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist-5k")
    ap.add_argument("--modality", default="image")
    ap.add_argument("--arch", default="cnn_medium")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="ekd-bench-") as tmp:
        out = Path(tmp)
        cfg = from_dict({
            "output_dir": str(out), "device": "cpu",
            "data": {"name": args.dataset},
            "teachers": [{"name": "t", "arch": args.arch, "modality": args.modality}],
            "embed": {"splits": ["train"], "batch_size": args.batch_size, "cpus_per_actor": 1,
                      "views": {"num_views": args.views, "crop_padding": 2, "flip": True}},
            "ray": {"num_cpus": 1},
        })
        ds = build_dataset(args.dataset, "train")
        spec = ds.spec(args.modality)
        model = build_encoder(args.arch, spec, ds.num_classes)  # untrained weights: the cost is the same
        ck = out / "t.pt"
        save_teacher(ck, model, cfg.teachers[0], cfg.data, spec, ds.num_classes, {"test_top1": None})
        rows = len(ds) * args.views

        # bare loop: the same per-batch work (get_batch, view replay, forward), no Ray, no files
        teacher = load_teacher(ck)
        per = max(1, args.batch_size // args.views)
        bare = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for s in range(0, len(ds), per):
                embed_rows(teacher, ds, np.arange(s, min(s + per, len(ds))), cfg.embed.views, torch.device("cpu"), False)
            bare.append(rows / (time.perf_counter() - t0))

        e2e, steady = [], []
        with ray_session(cfg.ray):
            task = embed_task(cfg.embed)
            teachers = existing(cfg.teachers, out, cfg.data)
            (_, _, key, _), = plan_shards(teachers, cfg.data, ["train"], cfg.embed, out)  # (prepares the data store)
            for r in range(args.repeats):
                shutil.rmtree(out / "shards", ignore_errors=True)  # each repeat writes its shard afresh
                t0 = time.perf_counter()
                gen = task.remote(asdict(teachers["t"]), to_dict(cfg.data), to_dict(cfg.embed), str(out), False,
                                  [("train", key.to_dict())])
                first = None
                first_rows = 0
                for ref in gen:
                    item = ray.get(ref)
                    if first is None and not isinstance(item, dict):
                        first, first_rows = time.perf_counter(), item
                t1 = time.perf_counter()
                e2e.append(rows / (t1 - t0))
                steady.append((rows - first_rows) / (t1 - first))

    res = {
        "dataset": args.dataset, "arch": args.arch, "views": args.views, "rows": rows, "torch": torch.__version__,
        "bare_rows_per_s": round(max(bare), 1),
        "task_rows_per_s_end_to_end": round(max(e2e), 1),
        "task_rows_per_s_steady": round(max(steady), 1),
        "ratio_end_to_end": round(max(e2e) / max(bare), 3),
        "ratio_steady": round(max(steady) / max(bare), 3),
        "target_ratio": 0.8,
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
