"""GPU smoke test for a machine or cluster node with a GPU: every GPU path once, small, in a few
minutes, with its step times against the same on CPU.

Parts (each reported with a status and, where it trains, its mean step time):
  teachers   the embedded default's three teachers, 2 epochs each, trained with use_gpu (Ray tasks)
  embed      the embed stage with a GPU task (embed.gpus_per_actor: 1), AMP on
  shards     a 2-epoch CE + KD + CRD distillation with AMP (bf16 autocast) on the shard path
  online     the same on the online path (the frozen teachers run on every step's fresh view)
  faiss      CRD with hard negatives on faiss-gpu when installed (else faiss-cpu, said so)
and, for the two distillations, the same run on CPU for the ratio.

    python bench/gpu_smoke.py [--device cuda|cpu] [--epochs 2]

Prints one JSON document. Without a GPU, ``--device cuda`` reports every part as skipped (exit 0);
``--device cpu`` runs the same parts on CPU (what the test suite's smoke test does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_kd.orchestration import pipeline  # noqa: E402
from ensemble_kd.core.config import with_overrides  # noqa: E402
from ensemble_kd.blocks.memory import faiss_gpu_problem  # noqa: E402
from ensemble_kd.core.raycluster import ray_session  # noqa: E402
from ensemble_kd.stages import distill as distill_stage  # noqa: E402
from _workdir import add_workdir_arg, workdir  # noqa: E402


def _part(out: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        out[name] = {"status": "ok", **(fn() or {})}
    except Exception as e:  # a smoke test reports every part, whatever failed before it
        out[name] = {"status": f"failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
    out[name]["seconds"] = round(time.perf_counter() - t0, 2)


def _distil(cfg, teachers, shards, outputs: str, gpu: bool, losses=None) -> dict:
    over = {"distill.teacher_outputs": outputs, "distill.use_gpu": gpu, "distill.epochs": cfg.distill.epochs,
            "distill.run_name": f"smoke-{outputs}-{'gpu' if gpu else 'cpu'}-{time.time_ns()}", "amp": gpu,
            "distill.cpus_per_worker": 1}
    if losses is not None:
        over["distill.losses"] = losses
    c = with_overrides(cfg, over, "<gpu_smoke>")
    inputs = pipeline.distill_inputs(c, teachers, shards if outputs == "shards" else None)
    res = distill_stage.run(c, log=lambda m: None, verbose=False, **inputs)
    steps = [h["epoch_seconds"] for h in res.history]
    return {"top1": res.final_top1, "epoch_s": sum(steps) / len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--epochs", type=int, default=2)
    add_workdir_arg(ap)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    out: dict = {"device": args.device, "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if gpu and not torch.cuda.is_available():
        out["status"] = "skipped: torch sees no CUDA device"
        print(json.dumps(out, indent=2))
        return
    with workdir(args.workdir, "ekd-gpu-smoke-") as tmp:
        over = {"output_dir": tmp, "embed.splits": ["train", "test"], "embed.gpus_per_actor": 1 if gpu else 0,
                "amp": gpu, "distill.epochs": args.epochs, "run.arms": [], "run.sweep": None, "ray.num_cpus": None,
                **{f"teachers.{i}.epochs": args.epochs for i in range(3)},
                **{f"teachers.{i}.use_gpu": gpu for i in range(3)}}
        cfg = pipeline.load(None, over)
        state: dict = {}
        with ray_session(cfg.ray):
            _part(out, "teachers", lambda: {"top1": {n: r.test_top1 for n, r in
                                                     state.setdefault("teachers", pipeline.train_teachers(
                                                         cfg, progress=False, log=lambda m: None)).items()}})
            _part(out, "embed", lambda: {"shards": len(state.setdefault("shards", pipeline.embed(
                cfg, state["teachers"], progress=False, log=lambda m: None)))})
            for path in ("shards", "online"):
                # online: CRD's teacher side from its teacher memory (mode reference); no shards to project
                losses = None if path == "shards" else [
                    {"name": "ce"}, {"name": "kd", "kwargs": {"temperature": 4.0}},
                    {"name": "crd", "weight": 0.8, "kwargs": {"mode": "reference", "num_negatives": 4096}}]
                _part(out, path, lambda: _distil(cfg, state["teachers"], state.get("shards"), path, gpu, losses))
                if gpu:
                    _part(out, f"{path}_cpu", lambda: _distil(cfg, state["teachers"], state.get("shards"), path, False,
                                                              losses))
                    if out[path].get("epoch_s") and out[f"{path}_cpu"].get("epoch_s"):
                        out[path]["ratio_cpu_over_gpu"] = round(out[f"{path}_cpu"]["epoch_s"] / out[path]["epoch_s"], 2)
            faiss_gpu = gpu and faiss_gpu_problem() is None  # use_gpu_faiss without one is an error now
            hard = [{"name": "ce"}, {"name": "crd", "weight": 0.8, "kwargs": {
                "negatives": "hard", "num_negatives": 256, "use_gpu_faiss": faiss_gpu, "per_sample": True}}]
            _part(out, "faiss", lambda: {"index": "faiss-gpu" if gpu and faiss_gpu else
                                         ("faiss-cpu (faiss-gpu not installed or sees no GPU)" if gpu else "faiss-cpu"),
                                         **_distil(cfg, state["teachers"], state.get("shards"), "shards", gpu, hard)})
    out["status"] = "ok" if all(v.get("status") == "ok" for v in out.values() if isinstance(v, dict)) else "failed"
    print(json.dumps(out, indent=2))
    if out["status"] != "ok":
        sys.exit(1)


if __name__ == "__main__":
    main()
