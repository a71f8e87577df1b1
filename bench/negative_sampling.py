"""Cost of CRD's per-anchor negative draws (``NegativeSampler.sample``, per_sample=True) and how
many of them repeat a row within an anchor's N.

    python bench/negative_sampling.py [--rows 50000] [--classes 100] [--negatives 16384]
                                      [--batch 64] [--steps 7] [--threads 1]

Prints JSON: per negatives mode, the median ms of one step's draw and the share of repeated
draws within an anchor's row (0 whenever N <= the anchor's eligible rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_kd.blocks.memory import NegativeSampler  # noqa: E402


def repeat_share(neg: torch.Tensor, num_rows: int) -> float:
    """Share of the (B, N) draws that repeat an earlier draw of the same anchor."""
    B, N = neg.shape
    flat = (neg + torch.arange(B)[:, None] * num_rows).reshape(-1).numpy()  # a row-unique key per draw
    return 1.0 - np.unique(flat).size / (B * N)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--negatives", type=int, default=16_384)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = torch.arange(args.rows) % args.classes  # (M,) balanced classes, as CIFAR-100
    anchors = torch.randperm(args.rows, generator=torch.Generator().manual_seed(1))[:args.batch]  # (B,)
    res = {"rows": args.rows, "negatives": args.negatives, "batch": args.batch, "threads": args.threads}
    for mode in ("class-aware", "uniform"):
        s = NegativeSampler(None, labels, mode=mode, num_negatives=args.negatives, per_sample=True, seed=0)
        times = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            neg, _ = s.sample(anchors, step)  # (B, N)
            times.append(time.perf_counter() - t0)
        res[f"{mode}_ms"] = 1000 * statistics.median(times)
        res[f"{mode}_repeat_share"] = repeat_share(neg, args.rows)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
