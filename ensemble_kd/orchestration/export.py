"""Export a distilled student for use outside ensemble-kd: TorchScript, ONNX, an MLflow model and
a model card (``ensemble-kd export``, and the end of ``ensemble-kd run``).

The student comes from its checkpoint (``students/<run>/student.pt``, the distill stage's
``ensemble-kd/student`` format, loaded with ``weights_only=True``): a run by name or path, or the
best finished run of an arm in the output folder's MLflow store (under the parent run of its
``summary.json`` when there is one). Every export takes the student's input tensor (one batch of
the dataset's modality, as the dataset serves it) and returns its logits as the one output.

Each file is written into a temporary folder and checked before anything is published: TorchScript
(``torch.jit.load``) and ONNX (onnxruntime) must give the checkpoint's own logits (the eager
encoder's) on a batch of the test split, max abs difference <= :data:`ATOL`, on a batch size other
than the one traced, so a batch size baked into the graph fails the check. The MLflow model
(``mlflow.pytorch.log_model``, pickle-free ``pt2`` format, with a tensor signature and an input
example) is logged into the run and loaded back through ``mlflow.pyfunc`` for the same check; a
failed check deletes it again. Only then are the files renamed into the destination folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import onnx
import onnxruntime
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from ensemble_kd.core import layout
from ensemble_kd.storage import mlflow_store
from ensemble_kd.storage.artifacts import read_index, summary_store
from ensemble_kd.core.config import ConfigError, ExperimentConfig
from ensemble_kd.stages.distill import STUDENT_FORMAT
from modalities import Encoder, PairedDataset, build_dataset, build_encoder

ATOL = 1e-4  # max abs difference of an export's logits from the checkpoint's
CHECK_ROWS = 64  # test rows the exports are checked on
TRACE_ROWS = 2  # rows the graphs are traced on (not CHECK_ROWS: a baked-in batch size fails the check)
EXAMPLE_ROWS = 4  # the MLflow input example (> 1, so its pt2 graph keeps a dynamic batch dimension)
MODEL_NAME = "student"  # the MLflow model's name in its run
SUMMARY = layout.SUMMARY

Log = Callable[[str], None]


class ExportError(ConfigError):
    """A student that cannot be found, read or exported, or an export that does not reproduce its
    checkpoint's logits; the message names the run, file or arm."""


class LogitsOnly(nn.Module):
    """The student encoder with its logits as the one output (an encoder returns (embedding, logits))."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[1]  # (B, C)


@dataclass(frozen=True)
class StudentSource:
    """Which student to export: its checkpoint and, where the store has it, its MLflow run."""

    path: Path  # the student.pt
    run_name: str
    output_dir: Path | None = None  # the folder of index/ and summary.json, when known
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    arm: str | None = None  # set when chosen as the best run of an arm
    selection: str | None = None  # the split that chose it then: val (a validation split) or test


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how closely each export reproduced the checkpoint's logits."""

    name: str
    dir: str
    torchscript: str
    onnx: str
    card: str
    run_name: str
    mlflow_run_id: str | None
    model_uri: str | None  # the MLflow model (``models:/<id>``), None without an MLflow run
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # torchscript / onnx / mlflow

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the student


def load_student(path: str | Path) -> tuple[dict[str, Any], LogitsOnly, PairedDataset]:
    """The checkpoint (``weights_only=True``), its student as a logits-only module in eval mode, and
    the test split of its dataset (what the exports are checked on)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"student checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that needs code to unpickle, or not a torch file at all
        raise ExportError(f"{path} cannot be read as an ensemble-kd student checkpoint with weights_only=True "
                          f"(a file that needs code to unpickle is refused): {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != STUDENT_FORMAT:
        what = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ExportError(f"{path} is not an ensemble-kd student checkpoint (format {what!r}, want {STUDENT_FORMAT!r})")
    missing = [k for k in ("arch", "modality", "state_dict", "config") if k not in ckpt]
    if missing:
        raise ExportError(f"{path}: student checkpoint without {missing}")
    ds = _test_split(ckpt, path)
    try:
        enc = build_encoder(ckpt["arch"], ds.spec(ckpt["modality"]), ds.num_classes, **dict(ckpt.get("arch_kwargs") or {}))
        enc.load_state_dict(ckpt["state_dict"], strict=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ExportError(f"{path}: the weights do not fit encoder {ckpt['arch']!r} on {ckpt['modality']!r}: "
                          f"{str(e).splitlines()[0]}") from None
    return ckpt, LogitsOnly(enc).eval(), ds


def _test_split(ckpt: Mapping[str, Any], path: Path) -> PairedDataset:
    data = ckpt["config"].get("data") or {}
    try:
        ds = build_dataset(data.get("name"), "test", root=data.get("root"), **dict(data.get("kwargs") or {}))
        ds.spec(ckpt["modality"])
    except (ValueError, KeyError, OSError) as e:  # DatasetError is a ValueError
        raise ExportError(f"{path}: cannot open the student's dataset {data.get('name')!r} to check the export: {e}") from None
    return ds


def check_batch(ds: PairedDataset, modality: str, rows: int = CHECK_ROWS) -> torch.Tensor:
    """The first ``rows`` test rows of the student's modality: (B, *spec.shape), as the dataset serves
    them (the loop feeds the student these same tensors)."""
    return ds.get_batch(np.arange(min(rows, len(ds))), [modality])["inputs"][modality]


# ---------------------------------------------------------------- finding the run


def _store(uri: str | None) -> str | None:
    """``uri`` if it names a store that exists (a SQLite file that is there, or any other URI)."""
    if uri is None:
        return None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    return uri


def _summary(out: Path) -> dict[str, Any] | None:
    p = out / SUMMARY
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{p} is unreadable: {e}") from None


def _mlflow_run_of(uri: str | None, run_name: str) -> str | None:
    """The MLflow run id of a distillation by its run name (tag ``ekd.run_name``), in any experiment."""
    if _store(uri) is None:
        return None
    c = mlflow_store.client(uri)
    ids = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(ids, filter_string=f"tags.`{mlflow_store.RUN_NAME_TAG}` = '{run_name}'", max_results=1) if ids else []
    return runs[0].info.run_id if runs else None


def find_run(out: str | Path, run: str, uri: str | None = None) -> StudentSource:
    """A run by name (``<out>/students/<run>/student.pt``) or by path (the student.pt or its folder);
    its MLflow run is looked up by name in the store (summary.json's, else ``uri``, else the default
    ``<out>/mlflow.db``)."""
    out = Path(out)
    given = Path(run).expanduser()
    if given.is_dir():
        given = given / layout.STUDENT_FILE
    if given.is_file():
        path = given.resolve()
    else:
        path = layout.student(out, run)
        if not path.is_file():
            known = sorted(p.parent.name for p in layout.students(out).glob(f"*/{layout.STUDENT_FILE}"))
            raise ExportError(f"no run {run!r}: neither a student checkpoint file nor {path}; runs under {layout.students(out)}: "
                              f"{known[-10:] or 'none'}")
    name = path.parent.name
    uri = summary_store(_summary(out), out) or uri or f"sqlite:///{layout.mlflow_db(out.resolve())}"
    return StudentSource(path, name, out, uri, _mlflow_run_of(uri, name))


def best_of_arm(out: str | Path, arm: str, uri: str | None = None, experiment: str | None = None,
                parent_run_id: str | None = None) -> StudentSource:
    """The finished run of ``arm`` with the best final val top-1 where every run has one (a
    validation split), else the best final test top-1 (ties: the lower seed), in the
    output folder's MLflow store. The store, experiment and parent run are those of
    ``<out>/summary.json`` (so the candidates are the latest `ensemble-kd run`'s runs), else the
    arguments (without a parent: every run of the arm in the experiment)."""
    out = Path(out)
    s = _summary(out) or {}
    uri = summary_store(s, out) or uri
    experiment = s.get("experiment") or experiment
    parent_run_id = s.get("parent_run_id") or parent_run_id
    if _store(uri) is None or experiment is None:
        raise ExportError(f"arm {arm!r}: no MLflow store to find its runs in (store {uri}, experiment {experiment}); "
                          f"export a run by name with --run")
    c = mlflow_store.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ExportError(f"arm {arm!r}: no MLflow experiment {experiment!r} at {uri}")
    scope = f" and tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    runs = [r for r in c.search_runs([exp.experiment_id], f"tags.arm = '{arm}' and attributes.status = 'FINISHED'{scope}",
                                     max_results=10_000)
            if "final/test_top1" in r.data.metrics and mlflow_store.RUN_NAME_TAG in r.data.tags]
    if not runs:
        others = sorted({r.data.tags["arm"] for r in c.search_runs([exp.experiment_id], f"tags.arm != ''{scope}",
                                                                    max_results=10_000) if "arm" in r.data.tags})
        raise ExportError(f"no finished run of arm {arm!r} in experiment {experiment!r} at {uri}"
                          + (f" under parent run {parent_run_id}" if parent_run_id else "") + f"; arms there: {others or 'none'}")
    key = "final/val_top1" if all("final/val_top1" in r.data.metrics for r in runs) else "final/test_top1"
    best = max(runs, key=lambda r: (r.data.metrics[key], -int(r.data.tags.get("seed", 0))))
    name = best.data.tags[mlflow_store.RUN_NAME_TAG]
    path = layout.student(out, name)
    if not path.is_file():
        raise ExportError(f"arm {arm!r}: its best run {name} (MLflow {best.info.run_id}) has no student checkpoint at {path}")
    return StudentSource(path, name, out, uri, best.info.run_id, arm, "val" if key == "final/val_top1" else "test")


def last_run(out: str | Path, uri: str | None = None) -> StudentSource:
    """The distillation ``<out>/index/distill.json`` names (the last `ensemble-kd distill`, or a
    `run` without arms)."""
    rec = read_index(out, "distill", "distill")
    if not rec.get("student_path"):
        raise ExportError(f"the last distillation under {out} ({rec.get('run_name')}) has not finished: no student to export")
    src = find_run(out, rec["student_path"], uri)
    return src if src.mlflow_run_id or not rec.get("mlflow_run_id") else \
        StudentSource(src.path, src.run_name, src.output_dir, src.mlflow_uri, rec["mlflow_run_id"])


# ---------------------------------------------------------------- the exports


def _max_diff(a: np.ndarray | torch.Tensor, ref: torch.Tensor, what: str, path: Path) -> float:
    a = np.asarray(a.detach().numpy() if isinstance(a, torch.Tensor) else a)
    if a.shape != tuple(ref.shape):
        raise ExportError(f"{what} export of {path} returns shape {a.shape}, the checkpoint's logits are {tuple(ref.shape)}")
    d = float(np.abs(a.astype(np.float64) - ref.numpy().astype(np.float64)).max())
    if not d <= ATOL:  # also refuses NaN
        raise ExportError(f"{what} export of {path} does not reproduce the checkpoint's logits: max abs difference "
                          f"{d:.3g} > {ATOL:g} on {ref.shape[0]} test rows")
    return d


@contextlib.contextmanager
def _failing_as(what: str, path: Path) -> Iterator[None]:
    """An exporter's or runtime's own failure (an op it cannot express, a shape guard, a graph the
    runtime refuses) as an ExportError naming the format and the checkpoint."""
    try:
        yield
    except ExportError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"{what} export of {path} failed: {type(e).__name__}: {first}") from e


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch 2.14 marks torch.jit deprecated and warns when a trace reads a shape as a Python value;
    the numerical check against the eager model is what tells a good export from a bad one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def write_torchscript(model: LogitsOnly, x: torch.Tensor, path: Path) -> None:
    with _quiet(), torch.no_grad():
        torch.jit.save(torch.jit.trace(model, x[:TRACE_ROWS]), str(path))


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with _quiet():
        return torch.jit.load(str(path), map_location="cpu")


def write_onnx(model: LogitsOnly, x: torch.Tensor, path: Path) -> None:
    """The dynamo exporter (torch's default), one input ``input`` with a dynamic batch dimension and
    one output ``logits``; the weights inside the file (no external data: students are small)."""
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, (x[:TRACE_ROWS],), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, dynamo=True,
                          verbose=False)


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins, outs = sess.get_inputs(), sess.get_outputs()
    if len(ins) != 1 or len(outs) != 1:
        raise ExportError(f"{path}: ONNX graph has {len(ins)} inputs and {len(outs)} outputs, want 1 and 1")
    return sess.run(None, {ins[0].name: x.numpy()})[0]


@contextlib.contextmanager
def _fluent(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """mlflow.pytorch.log_model works through MLflow's process-wide store and experiment (3.17 puts
    the model under the active experiment, not its run's): set both for the call, then put both back
    (each is also an environment variable that Ray workers started later would inherit). MLflow has
    no public way to unset the active experiment, hence its private global."""
    fluent = mlflow.tracking.fluent
    had, old = mlflow.tracking.is_tracking_uri_set(), mlflow.get_tracking_uri()
    old_exp, old_env = fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(uri)
    try:
        if experiment_id is not None:
            mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        mlflow.set_tracking_uri(old if had else None)
        fluent._active_experiment_id = old_exp
        if old_env is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = old_env


def log_mlflow_model(model: LogitsOnly, x: torch.Tensor, num_classes: int, uri: str, run_id: str) -> tuple[str, str]:
    """Log the student into its run as an MLflow pytorch model (pt2: torch.export's pickle-free
    format; a float32 tensor signature (-1, *shape) -> (-1, C); the first test rows as the input
    example); returns (model URI, model id)."""
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *x.shape[1:]))]),
                         outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))
    exp_id = mlflow_store.client(uri).get_run(run_id).info.experiment_id
    with _fluent(uri, exp_id), _quiet():
        info = mlflow.pytorch.log_model(model, name=MODEL_NAME, run_id=run_id, signature=sig,
                                        input_example=x[:EXAMPLE_ROWS].numpy(), serialization_format="pt2",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri, info.model_id


def predict_mlflow(model_uri: str, uri: str, x: torch.Tensor) -> np.ndarray:
    with _fluent(uri), _quiet():
        # suppress_warnings: no second pass over the environment's packages against the requirements
        # just written from this same environment (about 0.6 s)
        return np.asarray(mlflow.pyfunc.load_model(model_uri, suppress_warnings=True).predict(x.numpy()))


# ---------------------------------------------------------------- the model card


def _teachers(ckpt: Mapping[str, Any], src: StudentSource, tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Each distill teacher: arch, modality and content hash (the run's MLflow tag, which records the
    exact weights it learned from; else the output folder's teacher index)."""
    cfg = ckpt["config"]
    names = list((cfg.get("distill") or {}).get("teachers") or [])
    confs = {t.get("name"): t for t in cfg.get("teachers") or []}
    index: dict[str, Any] = {}
    if src.output_dir is not None and not all(f"teacher_sha256.{n}" in tags for n in names):
        with contextlib.suppress(ConfigError):
            index = {t.get("name"): t for t in read_index(src.output_dir, "teachers", "teachers train").get("teachers", [])}
    out = []
    for n in names:
        rec, conf = index.get(n) or {}, confs.get(n) or {}
        h = tags.get(f"teacher_sha256.{n}")
        where = "the run's MLflow tag" if h else "index/teachers.json" if rec.get("content_hash") else None
        out.append({"name": n, "arch": rec.get("arch") or conf.get("arch"), "modality": rec.get("modality") or conf.get("modality"),
                    "sha256": h or rec.get("content_hash"), "from": where, "test_top1": rec.get("test_top1")})
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def model_card(name: str, ckpt: Mapping[str, Any], src: StudentSource, x: torch.Tensor, num_classes: int,
               diffs: Mapping[str, float], model_uri: str | None, onnx_opset: int | None,
               tags: Mapping[str, str], summary: Mapping[str, Any] | None) -> str:
    """The markdown model card: files, input and output, teachers with content hashes, data, labels,
    method and losses, metrics (the run's, and its arm's over seeds with whatever statistics the
    summary holds)."""
    cfg = ckpt["config"]
    d, data = cfg.get("distill") or {}, cfg.get("data") or {}
    hist = ckpt.get("history") or []
    top1 = next((h["test_top1"] for h in reversed(hist) if "test_top1" in h), None)
    arm = src.arm or tags.get("arm")
    L = [f"# Model card: {name}", "",
         f"Student `{ckpt['arch']}`" + (f" ({json.dumps(ckpt.get('arch_kwargs'))})" if ckpt.get("arch_kwargs") else "")
         + f" on modality `{ckpt['modality']}` of `{data.get('name')}`, distilled by ensemble-kd run `{src.run_name}`"
         + (f" (arm `{arm}`" + (f", seed {d.get('seed')}" if d.get("seed") is not None else "") + ")" if arm else "") + ".",
         "", "## Files", "", "| file | load with |", "| --- | --- |",
         f"| `{name}.torchscript.pt` | `torch.jit.load(path)` |",
         f"| `{name}.onnx` | `onnxruntime.InferenceSession(path)` (ONNX opset {onnx_opset}) |"]
    if model_uri:
        L.append(f"| MLflow model `{model_uri}` (run `{src.mlflow_run_id}`, store `{src.mlflow_uri}`) | "
                 f"`mlflow.pyfunc.load_model(\"{model_uri}\")`; serve: `MLFLOW_TRACKING_URI={src.mlflow_uri} "
                 f"mlflow models serve -m {model_uri} --env-manager local` |")
    L.append(f"| checkpoint `{src.path}` | `torch.load(path, weights_only=True)` |")
    L += ["", "## Input and output", "",
          f"- input: one {str(x.dtype).replace('torch.', '')} tensor of shape (batch, {', '.join(map(str, x.shape[1:]))}): "
          f"modality `{ckpt['modality']}` of `{data.get('name')}`" + (f" ({json.dumps(data.get('kwargs'))})" if data.get("kwargs") else "")
          + " exactly as the dataset serves it (no further normalisation)",
          f"- output: one float32 tensor of shape (batch, {num_classes}): the logits; index = the dataset's class label",
          f"- checked on {x.shape[0]} test rows against the checkpoint's own logits (max abs difference, limit {ATOL:g}): "
          + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())]
    teachers = _teachers(ckpt, src, tags)
    L += ["", "## Teachers", ""]
    if teachers:
        L += ["| teacher | arch | modality | content sha256 | hash from |", "| --- | --- | --- | --- | --- |"]
        L += [f"| {t['name']} | {t['arch']} | {t['modality']} | `{t['sha256'] or 'unknown'}` | {t['from'] or '-'} |" for t in teachers]
    else:
        L.append("None: the student learned from the labels alone.")
    labels = d.get("labels")
    given = {k: v for k, v in (labels or {}).items() if v is not None} if isinstance(labels, dict) else labels
    L += ["", "## Data", "",
          f"- dataset `{data.get('name')}`, its fixed train/test split; the student reads modality `{ckpt['modality']}`",
          "- labels: " + (f"`distill.labels` {json.dumps(given)}: the supervised terms see only these labelled rows, the "
                          "teacher terms every paired row" if given else "every training row's label (no `distill.labels`)")]
    if d.get("selection"):
        L.append(f"- trained on the DFND selection `{d['selection']}` (its pseudo-labels as labels)")
    o = d.get("optim") or {}
    L += ["", "## Method", "",
          f"- teacher outputs: {d.get('teacher_outputs', 'shards')}; {d.get('epochs')} epochs, batch size {d.get('batch_size')}, "
          f"optimiser {o.get('name')} lr {o.get('lr')} ({o.get('schedule')} schedule), seed {d.get('seed')}",
          "", "| loss | weight | options |", "| --- | --- | --- |"]
    L += [f"| {t.get('name')} | {t.get('weight', 1.0)} | {json.dumps(t.get('kwargs') or {})} |" for t in d.get("losses") or []]
    val = next((h["val_top1"] for h in reversed(hist) if "val_top1" in h), None)  # where there is a validation split
    L += ["", "## Metrics", "", f"- this run: test top-1 {_fmt(top1)} after {len(hist)} epochs"
          + (f"; val top-1 {_fmt(val)}" if val is not None else "")
          + (f" (its arm's best on {src.selection} top-1)" if src.selection else "")]
    row = ((summary or {}).get("arms") or {}).get(arm) if arm else None
    if row:
        L.append(f"- arm `{arm}` over seeds {row.get('seeds')} (summary.json): mean {_fmt(row.get('mean_top1'))} "
                 f"+- {_fmt(row.get('std_top1'))} (sample std); per seed {', '.join(map(_fmt, row.get('top1') or []))}")
        known = {"teacher_set", "teachers", "method", "mean_top1", "std_top1", "seeds", "top1"}
        L += [f"- {k}: {_fmt(v)}" for k, v in row.items() if k not in known]  # intervals, paired differences, ...
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- the whole export


def export_student(src: StudentSource, dest: str | Path | None = None, name: str | None = None, mlflow_model: bool = True,
                   log: Log = print) -> ExportResult:
    """Write ``<name>.torchscript.pt``, ``<name>.onnx`` and ``<name>.model_card.md`` into ``dest``
    (default ``<output_dir>/exports/<name>``; ``name``: the arm, else the run name), each export
    checked against the checkpoint's logits before anything is published, and (with
    ``mlflow_model`` and an MLflow run) log the student into its run as an MLflow model.
    Raises :class:`ExportError` naming the file when a check fails; nothing is then left in ``dest``."""
    ckpt, model, ds = load_student(src.path)
    name = name or src.arm or src.run_name
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"export name {name!r} is not a file name")
    dest = Path(dest) if dest is not None else layout.exports(src.output_dir or src.path.parent) / name
    x = check_batch(ds, ckpt["modality"])
    with torch.no_grad():
        ref = model(x)  # (B, C): the checkpoint's logits, eager
    num_classes = int(ref.shape[1])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    files = {"torchscript": tmp / f"{name}.torchscript.pt", "onnx": tmp / f"{name}.onnx", "card": tmp / f"{name}.model_card.md"}
    model_id = None
    try:
        diffs = {}
        with _failing_as("TorchScript", src.path):
            write_torchscript(model, x, files["torchscript"])
            diffs["torchscript"] = _max_diff(load_torchscript(files["torchscript"])(x), ref, "TorchScript", src.path)
        with _failing_as("ONNX", src.path):
            write_onnx(model, x, files["onnx"])
            onnx.checker.check_model(str(files["onnx"]))
            diffs["onnx"] = _max_diff(run_onnx(files["onnx"], x), ref, "ONNX", src.path)
        opset = next((o.version for o in onnx.load(str(files["onnx"]), load_external_data=False).opset_import
                      if o.domain in ("", "ai.onnx")), None)
        model_uri, tags = None, {}
        if mlflow_model and src.mlflow_run_id and _store(src.mlflow_uri):
            tags = mlflow_store.client(src.mlflow_uri).get_run(src.mlflow_run_id).data.tags
            with _failing_as("MLflow", src.path):
                model_uri, model_id = log_mlflow_model(model, x, num_classes, src.mlflow_uri, src.mlflow_run_id)
                diffs["mlflow"] = _max_diff(predict_mlflow(model_uri, src.mlflow_uri, x), ref, "MLflow", src.path)
        elif mlflow_model:
            log(f"export: {src.run_name} has no MLflow run in {src.mlflow_uri or 'any store'}: no MLflow model logged")
        summary = _summary(src.output_dir) if src.output_dir is not None else None
        files["card"].write_text(model_card(name, ckpt, src, x, num_classes, diffs, model_uri, opset, tags, summary))
        dest.mkdir(parents=True, exist_ok=True)
        for f in files.values():  # each file whole (renamed), and only once every check passed
            os.replace(f, dest / f.name)
    except BaseException:
        if model_id is not None:  # a model that failed its check does not stay in the run
            with contextlib.suppress(Exception):
                mlflow_store.client(src.mlflow_uri).delete_logged_model(model_id)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {k: str(dest / f.name) for k, f in files.items()}
    if model_uri:
        c = mlflow_store.client(src.mlflow_uri)
        for k in ("torchscript", "onnx", "card"):
            c.log_artifact(src.mlflow_run_id, out[k], artifact_path="export")
        c.set_tag(src.mlflow_run_id, "ekd.export.model_uri", model_uri)
    res = ExportResult(name, str(dest), out["torchscript"], out["onnx"], out["card"], src.run_name, src.mlflow_run_id,
                       model_uri, diffs)
    chosen = f" on {src.selection} top-1" if src.selection else ""  # test top-1 is what the card reports
    log(f"export: {src.run_name}" + (f" (best of arm {src.arm}{chosen})" if src.arm else "") + f" -> {dest}: "
        + ", ".join(f"{k} max |diff| {v:.2g}" for k, v in diffs.items()) + (f"; MLflow model {model_uri}" if model_uri else ""))
    return res


def headline_arm(cfg: ExperimentConfig) -> str | None:
    """The arm `ensemble-kd run` exports: run.export_arm, else the last of run.arms (None without arms)."""
    return cfg.run.export_arm or (cfg.run.arms[-1].name if cfg.run.arms else None)


def export_after_run(cfg: ExperimentConfig, summary: Mapping[str, Any], log: Log = print) -> ExportResult | None:
    """The end of `ensemble-kd run`: export the best student of the headline arm (of the one distill
    run without arms). An export that cannot be made is reported, not raised: the run's results stand."""
    out = Path(cfg.output_dir)
    arm = headline_arm(cfg)
    why = (summary.get("failed_arms") or {}).get(arm) if arm is not None else None
    if why is not None or (arm is not None and summary.get("arms") is not None and arm not in summary["arms"]):
        log(f"export: nothing to export: arm {arm!r} (the one run exports) has no finished trial" + (f"; {why}" if why else ""))
        return None
    try:
        if arm is None:
            src = last_run(out, summary.get("mlflow_tracking_uri"))
        elif summary.get("parent_run_id") is None:
            log(f"export: skipped (tracking is off, so the runs of arm {arm} cannot be told apart); "
                f"export one with: ensemble-kd export --out {out} --run NAME")
            return None
        else:
            src = best_of_arm(out, arm)  # the store, experiment and parent run of summary.json
        return export_student(src, log=log)
    except ExportError as e:
        log(f"export: failed: {e}")
        return None
