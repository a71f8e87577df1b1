"""The marker base class of every error this project raises on purpose.

It lives here, in the bottom import layer (``modalities`` imports nothing from ``ensemble_kd``),
because the dataset and registry errors defined in this package carry it too; ``ensemble_kd.core.errors``
re-exports it with the function that finds it inside Ray's wrappers.
"""
from __future__ import annotations


class ProjectError(Exception):
    """An error the project raises on purpose: its message names the file or field at fault and
    says what to do, so the command line prints it as one line (``ensemble-kd: error: ...``) instead
    of a traceback, wherever it was raised (the driver, a Ray task, a Ray Train worker, a Tune
    trial). The concrete classes keep their standard bases (``ValueError``, ``RuntimeError``,
    ``OSError``, ...) first, so ``except ValueError`` callers still catch them; this class only
    marks them. An error without it is a bug and keeps its traceback."""
