"""Paired statistics over seeds: is arm A better than arm B, seed for seed?

Two arms run with the same seed share everything the seed decides (the student's initial
weights, the data order, the labelled subset), so the per-seed differences d_s = A_s - B_s are
the quantity to summarise, not the two arms' separate means: :func:`paired_difference` gives their
mean, a 95% **t interval** (mean +- t_{0.975, n-1} * sd / sqrt(n), Student's t with n - 1
degrees of freedom, the sample sd of the differences; none for a single pair) and how many seeds
improved, got worse or tied. Only seeds both arms finished are paired.

The t quantile comes from SciPy (``scipy.stats.t.ppf``; SciPy is installed with scikit-learn, a
dependency). With 3-5 seeds the interval is wide: t_{0.975} is 4.30 at n = 3 and 2.78 at n = 5.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

INTERVAL = "t"
"""How the 95% interval is computed (recorded beside every interval)."""

TIE = 1e-12  # |d| below this counts as a tie (top-1 values are multiples of 1/test rows)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t  # here: SciPy costs ~0.3 s to import, and only the summaries need it

    return float(t.ppf(p, df))


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float], level: float = 0.95) -> dict[str, Any] | None:
    """Paired summary of ``a`` - ``b`` over the keys (seeds) both have; None when they share none.

    Returns ``n`` (pairs), ``seeds``, ``mean_diff``, ``std_diff`` (sample sd; 0 for one pair),
    ``ci95`` ([low, high], None for one pair), ``interval`` ("t"), ``improved``/``worse``/``tied``
    (seeds where a > b, a < b, a == b)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(d)
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else 0.0
    ci = None
    if n > 1:
        half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"n": n, "seeds": seeds, "mean_diff": mean, "std_diff": sd, "ci95": ci, "interval": INTERVAL,
            "improved": sum(x > TIE for x in d), "worse": sum(x < -TIE for x in d), "tied": sum(abs(x) <= TIE for x in d)}


def format_paired(p: Mapping[str, Any] | None) -> str:
    """``+0.0267 [-0.0251, +0.0784] 3/3`` (mean difference, 95% t interval, seeds improved / pairs)."""
    if not p:
        return "-"
    ci = f" [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p.get("ci95") else " [n=1]"
    return f"{p['mean_diff']:+.4f}{ci} {p['improved']}/{p['n']}"
