"""Cost of one distillation step, as ratios to a CE-only step (same student, same batch).

(a) CE-only student step.
(b) our CE + KD + CRD step, N negatives, teacher outputs read from the shards (no teacher
    forward), teacher side projected exactly, for 1 and 3 teachers; shared negatives
    (per_sample: false) and per-sample negatives.
(c) what the reference code (RepDistiller) does: a forward of every teacher on every step, and
    N per-sample negatives gathered from dataset-sized memories on both sides
    ((B, N+1, feat) tensors per teacher and direction).
Targets: (b, shared)/(a) <= 1.3 and (c)/(b) >= 3 for 3 teachers.

    python bench/step_cost.py [--negatives 16384] [--batch 64] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_kd.orchestration import pipeline  # noqa: E402
from ensemble_kd.core.config import load_config  # noqa: E402
from ensemble_kd.training.data import DistillData  # noqa: E402
from ensemble_kd.losses.kd import kd_loss  # noqa: E402
from ensemble_kd.training.loop import build_module  # noqa: E402
from ensemble_kd.core.raycluster import ray_session  # noqa: E402
from ensemble_kd.storage.teacher_checkpoint import load_teacher  # noqa: E402
from modalities import build_dataset  # noqa: E402
from _workdir import add_workdir_arg, workdir  # noqa: E402


def time_steps(step, n: int) -> float:
    step()  # warm-up (CRD sets Z on its first step)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


STUDENT: dict = {}


def ours(cfg, teachers, losses, ds, rows, steps):
    c = load_config(None, {"output_dir": cfg.output_dir, "distill.teachers": teachers, "distill.losses": losses, **STUDENT})
    data = DistillData(ds, c.distill.student.modality, pipeline.train_shards(c) if teachers else None)
    torch.manual_seed(0)
    m = build_module(c, data, ds.num_classes, torch.device("cpu"))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    def step():
        parts = m(data.batch(rows, torch.device("cpu")))
        loss = sum(m.weights[k] * out.loss for k, out in parts.items())
        opt.zero_grad()
        loss.backward()
        opt.step()

    return time_steps(step, steps), m


def reference(cfg, teacher_paths, ds, rows, N, steps, feat=128, tau=0.07):
    """RepDistiller-style CRD+KD: teacher forwards + per-sample negatives from both memories."""
    c = load_config(None, {"output_dir": cfg.output_dir, "distill.teachers": [], "distill.losses": [{"name": "ce"}], **STUDENT})
    data = DistillData(ds, c.distill.student.modality, None)
    torch.manual_seed(0)
    student = build_module(c, data, ds.num_classes, torch.device("cpu")).student
    teachers = {n: load_teacher(p) for n, p in teacher_paths.items()}
    M = len(ds)
    heads = torch.nn.ModuleDict({n: torch.nn.ModuleDict({"s": torch.nn.Linear(student.embed_dim, feat),
                                                         "t": torch.nn.Linear(t.embed_dim, feat)}) for n, t in teachers.items()})
    mem_s = {n: F.normalize(torch.randn(M, feat), dim=1) for n in teachers}
    mem_t = {n: F.normalize(torch.randn(M, feat), dim=1) for n in teachers}
    opt = torch.optim.SGD(list(student.parameters()) + list(heads.parameters()), lr=0.01, momentum=0.9)
    pos = torch.as_tensor(ds.positions_of(data.bank.sample_ids.numpy()))
    g = torch.Generator().manual_seed(0)

    def step():
        idx = pos[rows]
        b = ds.get_batch(idx.numpy())
        s_emb, s_logits = student(b["inputs"][c.distill.student.modality])
        loss = F.cross_entropy(s_logits, b["label"])
        t_logits = []
        for n, t in teachers.items():
            with torch.no_grad():
                t_emb, tl = t.model(b["inputs"][t.modality])  # a teacher forward on every step
            t_logits.append(tl)
            B = len(idx)
            neg = torch.randint(0, M, (B, N + 1), generator=g)  # (B, 1+N) per-sample, from a dataset-sized memory
            neg[:, 0] = idx
            vs = F.normalize(heads[n]["s"](s_emb), dim=1)  # (B, feat)
            vt = F.normalize(heads[n]["t"](t_emb), dim=1)
            w_t = mem_t[n][neg]  # (B, 1+N, feat)
            w_s = mem_s[n][neg]
            out_s = torch.exp(torch.bmm(w_t, vs[:, :, None]).squeeze(2) / tau)  # (B, 1+N)
            out_t = torch.exp(torch.bmm(w_s, vt[:, :, None]).squeeze(2) / tau)
            for out in (out_s, out_t):
                P = out / (out.mean().detach() * M)
                Pn = 1.0 / M
                ld1 = torch.log(P[:, 0] / (P[:, 0] + N * Pn + 1e-7))
                ld0 = torch.log((N * Pn) / (P[:, 1:] + N * Pn + 1e-7))
                loss = loss + 0.8 * -(ld1.sum() + ld0.sum()) / B
            with torch.no_grad():
                mem_s[n][idx] = F.normalize(0.5 * mem_s[n][idx] + 0.5 * vs.detach(), dim=1)
                mem_t[n][idx] = F.normalize(0.5 * mem_t[n][idx] + 0.5 * vt.detach(), dim=1)
        loss = loss + kd_loss(s_logits, t_logits, 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return time_steps(step, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--negatives", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--student", default="mlp", help="student encoder (e.g. resnet8x4 on --modality pix)")
    ap.add_argument("--modality", default="fou", help="student modality of uci-mfeat")
    ap.add_argument("--teacher-epochs", type=int, default=2, help="epochs of the default's teachers (trained first)")
    add_workdir_arg(ap)
    args = ap.parse_args()
    N = args.negatives
    STUDENT["distill.student"] = {"arch": args.student, "modality": args.modality, "arch_kwargs": {}}
    with workdir(args.workdir, "ekd-bench-") as tmp:
        cfg = load_config(None, {"output_dir": tmp, "embed.splits": ["train"],
                                 **{f"teachers.{i}.epochs": args.teacher_epochs for i in range(3)}})
        with ray_session(cfg.ray):  # teachers train on Ray (a Ray task each), then embed
            teachers = pipeline.train_teachers(cfg, progress=False, log=lambda m: None)
            paths = teachers.paths()
            pipeline.embed(cfg, teachers, progress=False, log=lambda m: None)
        torch.set_num_threads(1)  # one core per step, as a 1-CPU Ray Train worker runs
        ds = build_dataset("uci-mfeat", "train")
        rows = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[: args.batch]
        crd = lambda per_sample: {"name": "crd", "weight": 0.8, "kwargs": {"num_negatives": N, "per_sample": per_sample}}  # noqa: E731
        kd = {"name": "kd", "kwargs": {"temperature": 4.0}}
        ce = {"name": "ce"}
        names = [t.name for t in cfg.teachers]
        res = {"student": f"{args.student} on {args.modality}", "negatives": N, "batch": args.batch, "threads": 1}
        res["a_ce_ms"] = 1000 * ours(cfg, [], [ce], ds, rows, args.steps)[0]
        for k in (1, 3):
            for per in (False, True):
                tag = f"b_crd_kd_{k}t_{'per_sample' if per else 'shared'}_ms"
                res[tag] = 1000 * ours(cfg, names[:k], [ce, kd, crd(per)], ds, rows, args.steps)[0]
        res["c_reference_3t_ms"] = 1000 * reference(cfg, {n: paths[n] for n in names}, ds, rows, N, max(2, args.steps // 2))
    a = res["a_ce_ms"]
    res["ratio_b_shared_1t_over_a"] = res["b_crd_kd_1t_shared_ms"] / a
    res["ratio_b_shared_3t_over_a"] = res["b_crd_kd_3t_shared_ms"] / a
    res["ratio_c_over_b_shared_3t"] = res["c_reference_3t_ms"] / res["b_crd_kd_3t_shared_ms"]
    res["ratio_c_over_b_per_sample_3t"] = res["c_reference_3t_ms"] / res["b_crd_kd_3t_per_sample_ms"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}, indent=2))


if __name__ == "__main__":
    main()
