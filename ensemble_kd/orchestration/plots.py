"""Comparison plots (matplotlib, headless): accuracy by arm (with a reference line), paired
differences with their intervals, and accuracy against CRD's tau and N."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ensemble_kd.core.files import atomic_write  # noqa: E402

SET_COLOURS = {"none": "#8c8c8c", "single": "#4c72b0", "ensemble": "#dd8452"}


def plot_comparison(groups: Mapping[str, Mapping], sweep: Sequence[Mapping], path: str | Path, title: str = "",
                    axes: Sequence[str] | None = None, reference: tuple[str, float] | None = None,
                    paired: Mapping[str, Mapping] | None = None, paired_title: str = "paired difference") -> Path:
    """Write a PNG: left, mean +- std top-1 per group with each seed's value as a dot (coloured by
    ``teacher_set`` when a group has one; hatched when its ``labels`` is a subset, not ``all``),
    and ``reference`` (label, top-1) as a dashed line; then (when ``paired`` has entries) each
    group's paired difference to its baseline with its 95% interval and seeds improved/pairs; then
    (when ``sweep`` has points) top-1 against the first of ``axes`` (log scale), one line per value
    of the second (default: CRD's tau and N).
    ``groups``: name -> {"values": [top1, ...], "teacher_set"?: str, "labels"?: str}; ``paired``:
    name -> {"mean_diff", "ci95": [lo, hi] | None, "improved", "n"}; ``sweep``: [{axis: value, ...,
    "top1": float}]. The file is written to a temp name, then renamed."""
    path = Path(path)
    paired = {n: p for n, p in (paired or {}).items() if p}
    ncols = 1 + bool(paired) + bool(sweep)
    fig, panels = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    _bars(panels[0, 0], groups, title, reference)
    if paired:
        _paired_panel(panels[0, 1], paired, paired_title)
    if sweep:
        _sweep_panel(panels[0, ncols - 1], sweep, tuple(axes or ("tau", "num_negatives")))
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def _bars(ax, groups: Mapping[str, Mapping], title: str, reference: tuple[str, float] | None) -> None:
    """One bar per group; groups of another label setting after a gap, under a heading of their own."""
    names = list(groups)
    setting = [str(groups[n].get("labels", "all")) for n in names]
    xs = [i + 0.6 * sum(setting[j] != setting[j - 1] for j in range(1, i + 1)) for i in range(len(names))]
    for x, name, lab in zip(xs, names, setting):
        vals = np.asarray(groups[name]["values"], dtype=float)
        colour = SET_COLOURS.get(str(groups[name].get("teacher_set")), "#55a868")
        std = vals.std(ddof=1) if len(vals) > 1 else 0.0
        ax.bar(x, vals.mean(), yerr=std, color=colour, alpha=0.85, capsize=4, hatch=None if lab == "all" else "//",
               edgecolor=None if lab == "all" else "white")
        ax.scatter(np.full(len(vals), x) + np.linspace(-0.15, 0.15, len(vals)), vals, color="k", s=10, zorder=3)
        ax.text(x, max(vals.mean() + std, vals.max()) + 0.004, f"{vals.mean():.3f}", ha="center", va="bottom", fontsize=8)
    if len(set(setting)) > 1:  # say which bars are which label setting
        for lab in dict.fromkeys(setting):
            at = [x for x, s in zip(xs, setting) if s == lab]
            ax.text((at[0] + at[-1]) / 2, 0.985, "all labels" if lab == "all" else f"labels: {lab}", ha="center",
                    va="top", fontsize=8, style="italic")
    lo = min(float(np.min(g["values"])) for g in groups.values()) if groups else 0.0
    if reference is not None:
        ax.axhline(reference[1], color="k", ls="--", lw=1, label=f"{reference[0]}: {reference[1]:.3f}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.93))
        lo = min(lo, reference[1])
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_xticks(xs, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("student test top-1 (mean +- std over seeds)")
    ax.set_title(title or "student top-1 by arm")


def _paired_panel(ax, paired: Mapping[str, Mapping], title: str) -> None:
    """Horizontal: each group's mean paired difference, its 95% interval, seeds improved/pairs."""
    names = list(paired)
    for i, n in enumerate(names):
        p = paired[n]
        ci = p.get("ci95")
        err = None if not ci else [[p["mean_diff"] - ci[0]], [ci[1] - p["mean_diff"]]]
        ax.errorbar(p["mean_diff"], i, xerr=err, fmt="o", color="#4c72b0", capsize=4)
        ax.text(p["mean_diff"], i - 0.15, f"{p['mean_diff']:+.3f}  {p['improved']}/{p['n']}", ha="center", va="bottom", fontsize=7)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 difference (mean over seeds, 95% t interval)")
    ax.set_title(title, fontsize=9)


def _sweep_panel(ax2, sweep: Sequence[Mapping], axes: tuple[str, ...]) -> None:
    x_key, line_key = axes
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
