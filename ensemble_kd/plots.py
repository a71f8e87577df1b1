"""Comparison plots (matplotlib, headless): accuracy by arm, and accuracy against CRD's tau and N."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ensemble_kd.checkpoint import atomic_write  # noqa: E402

SET_COLOURS = {"none": "#8c8c8c", "single": "#4c72b0", "ensemble": "#dd8452"}


def plot_comparison(groups: Mapping[str, Mapping], sweep: Sequence[Mapping], path: str | Path, title: str = "",
                    axes: Sequence[str] | None = None) -> Path:
    """Write a PNG: left, mean +- std top-1 per group with each seed's value as a dot (coloured by
    ``teacher_set`` when a group has one); right (when ``sweep`` has points), top-1 against the
    first of ``axes`` (log scale), one line per value of the second (default: CRD's tau and N).
    ``groups``: name -> {"values": [top1, ...], "teacher_set"?: str}; ``sweep``: [{axis: value,
    ..., "top1": float}]. The file is written to a temp name, then renamed."""
    x_key, line_key = tuple(axes or ("tau", "num_negatives"))
    path = Path(path)
    ncols = 2 if sweep else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0, 0]
    names = list(groups)
    for i, name in enumerate(names):
        vals = np.asarray(groups[name]["values"], dtype=float)
        colour = SET_COLOURS.get(str(groups[name].get("teacher_set")), "#55a868")
        std = vals.std(ddof=1) if len(vals) > 1 else 0.0
        ax.bar(i, vals.mean(), yerr=std, color=colour, alpha=0.85, capsize=4)
        ax.scatter(np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)), vals, color="k", s=10, zorder=3)
        ax.text(i, max(vals.mean() + std, vals.max()) + 0.004, f"{vals.mean():.3f}", ha="center", va="bottom", fontsize=8)
    lo = min(float(np.min(g["values"])) for g in groups.values()) if groups else 0.0
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("student test top-1 (mean +- std over seeds)")
    ax.set_title(title or "student top-1 by arm")
    if sweep:
        ax2 = axes[0, 1]
        for n in sorted({p[line_key] for p in sweep}):
            pts = sorted((float(p[x_key]), float(p["top1"])) for p in sweep if p[line_key] == n)
            ax2.plot([t for t, _ in pts], [a for _, a in pts], marker="o", label=f"{line_key} = {n:g}")
        ax2.set_xscale("log")
        xs = sorted({float(p[x_key]) for p in sweep})
        ax2.set_xticks(xs, [f"{t:g}" for t in xs])
        ax2.minorticks_off()
        ax2.set_xlabel(x_key)
        ax2.set_ylabel("student test top-1")
        ax2.set_title(f"sweep: {x_key} and {line_key}")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path
