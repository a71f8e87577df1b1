"""The output folder's layout: the one place that names every path under ``output_dir``.

Every module asks here for where a thing lives instead of spelling the folder's names itself, so
moving a thing (a cache, an object store) is a change in one file. docs/design.md, "Files on
disk", shows the tree. Each function takes the output folder (``cfg.output_dir``) and returns a
:class:`~pathlib.Path`; nothing here touches the disk.
"""
from __future__ import annotations

from pathlib import Path

DATA = "data"  # the data store (storage/datastore.py)
TEACHERS = "teachers"  # teacher checkpoints, <name>.pt
SHARDS = "shards"  # the teachers' Arrow shards
SELECTIONS = "selections"  # DFND selections
INDEX = "index"  # the stages' artifacts: <stage>.json pointers
RAY_RESULTS = "ray_results"  # each training run's state (local mode) or Ray Train's checkpoints
TUNE = "tune"  # Ray Tune experiments
STUDENTS = "students"  # distilled students, <run>/student.pt
EXPORTS = "exports"  # `ensemble-kd export`
LOGS = "logs"  # each command's log file
SUMMARY = "summary.json"  # `ensemble-kd run`'s summary
PLOT = "summary.png"  # and its figure
MLFLOW_DB = "mlflow.db"  # the folder's own MLflow store (when no tracking URI is set)
MLARTIFACTS = "mlartifacts"  # that store's artifacts, beside it
STUDENT_FILE = "student.pt"

# Folders whose recorded paths an index re-roots when the output folder has moved (storage/artifacts.py).
OWN_FOLDERS = (SHARDS, SELECTIONS, STUDENTS, RAY_RESULTS)


def data(out: str | Path) -> Path:
    return Path(out) / DATA


def teachers(out: str | Path) -> Path:
    return Path(out) / TEACHERS


def shards(out: str | Path) -> Path:
    return Path(out) / SHARDS


def selections(out: str | Path) -> Path:
    return Path(out) / SELECTIONS


def index(out: str | Path) -> Path:
    return Path(out) / INDEX


def ray_results(out: str | Path) -> Path:
    return Path(out) / RAY_RESULTS


def run_dir(out: str | Path, run: str) -> Path:
    """A training run's folder (its state file or Ray Train's checkpoints)."""
    return ray_results(out) / run


def tune(out: str | Path) -> Path:
    return Path(out) / TUNE


def students(out: str | Path) -> Path:
    return Path(out) / STUDENTS


def student(out: str | Path, run: str) -> Path:
    """The student checkpoint of training run ``run``."""
    return students(out) / run / STUDENT_FILE


def exports(out: str | Path) -> Path:
    return Path(out) / EXPORTS


def logs(out: str | Path) -> Path:
    return Path(out) / LOGS


def summary(out: str | Path) -> Path:
    return Path(out) / SUMMARY


def plot(out: str | Path) -> Path:
    return Path(out) / PLOT


def mlflow_db(out: str | Path) -> Path:
    return Path(out) / MLFLOW_DB


def mlartifacts(out: str | Path) -> Path:
    return Path(out) / MLARTIFACTS
