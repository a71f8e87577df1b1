"""The config reference (ensemble_kd/core/config_docs.py): every field by its YAML path with type,
default and doc line, printed by `ensemble-kd config docs`, written to docs/config.md (which must
match it), and each loss's options in `ensemble-kd list losses`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ensemble_kd.cli import main
from ensemble_kd.core import config_docs
from ensemble_kd.core.config import ExperimentConfig, flatten, from_dict, to_dict
from ensemble_kd.losses import LOSSES
from ensemble_kd.losses.base import loss_options

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config.md"


def _full_config() -> ExperimentConfig:
    """A config with an item in every list of sections and every optional section given, so that
    flattening it reaches every field."""
    data = {"name": "uci-mfeat"}
    return from_dict({
        "teachers": [{"name": "t"}],
        "select": {"teacher_data": data},
        "distill": {"eval_data": data, "losses": [{"name": "ce"}]},
        "run": {"arms": [{"name": "a", "losses": [{"name": "ce"}], "labels": {"count": 5}}],
                "sweep": {"arm": "a", "space": {"distill.epochs": {"grid": [1]}}}},
    })


def _yaml_path(dotted: str) -> str:
    """``distill.losses.0.kwargs`` -> ``distill.losses[].kwargs``; ``embed.splits.1`` -> ``embed.splits``."""
    return re.sub(r"\.\d+$", "", re.sub(r"\.\d+\.", "[].", dotted))


def test_every_field_of_a_config_is_listed_by_its_yaml_path():
    paths = {r.path for r in config_docs.fields()}
    want = {_yaml_path(k) for k in flatten(_full_config())} - {""}
    want = {k for k in want if not k.startswith("run.sweep.space.")}  # (a mapping's own keys are values)
    assert want, "the config flattened to nothing"
    assert sorted(want - paths) == [], "fields missing from the reference"
    for key in ("distill.losses[].kwargs", "teachers[].arch_kwargs", "run.arms[].losses[].name", "embed.views.seed",
                "distill.eval_data.root", "data.kwargs"):
        assert key in paths, key


def test_each_row_has_a_type_a_default_and_a_description():
    rows = {r.path: r for r in config_docs.fields()}
    assert [p for p, r in rows.items() if not r.doc] == []  # a field without Field(description=...) fails here
    kw = rows["distill.losses[].kwargs"]
    assert (kw.type, kw.default, kw.section) == ("mapping", "{}", "distill") and "options of the loss" in kw.doc
    assert (rows["distill.optim.lr"].type, rows["distill.optim.lr"].default) == ("float (> 0)", "0.05")
    assert rows["teachers[].name"].default == "required"
    assert rows["distill.optim.name"].type == "'sgd' | 'adamw'"
    assert rows["teachers[].decay_epochs"].default == "[150, 180, 210]"
    assert rows["ray.num_cpus"].type == "int (>= 1) | null" and rows["ray.num_cpus"].default == "null"
    assert rows["embed.workers_per_teacher"].type == "int (>= 1) | 'auto'"
    assert rows["distill.losses"].default == "[{name: ce, weight: 1.0, kwargs: {}}]"
    assert rows["amp"].section == config_docs.TOP_LEVEL and rows["run.arms[].set"].section == "run"


def test_config_docs_prints_every_field_by_path_not_by_class(capsys):
    assert main(["config", "docs"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"\b[A-Z][a-z]+Config\b", out), "a Python class name in the reference"
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert set(lines) >= {r.path for r in config_docs.fields() if "." in r.path or r.section == config_docs.TOP_LEVEL}
    assert re.search(r"mapping = \{\}\s+-- options of the loss", lines["distill.losses[].kwargs"])
    assert "float (> 0) = 0.05" in lines["distill.optim.lr"]
    heads = [ln.split(":")[0] for ln in out.splitlines() if not ln.startswith(" ")]
    assert heads == [config_docs.TOP_LEVEL, "data", "teachers", "embed", "select", "ray", "distill", "tracking",
                     "tune", "run"], heads


def test_docs_config_md_is_the_generated_reference(capsys):
    assert main(["config", "docs", "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed == config_docs.markdown()
    assert DOC.is_file() and DOC.read_text() == printed, (
        f"docs/config.md is stale: regenerate it with `{config_docs.REGENERATE}` (from the repository root)")


def test_markdown_has_a_table_per_top_level_section():
    md = config_docs.markdown()
    sections = re.findall(r"^## (.+)$", md, re.M)
    assert sections == ["Top level", "data", "teachers", "embed", "select", "ray", "distill", "tracking", "tune", "run"]
    rows = re.findall(r"^\| `([^`]+)` \|", md, re.M)
    top = set(sections[1:])
    assert rows == [r.path for r in config_docs.fields() if r.path not in top]  # a section's own row is its heading
    line = next(ln for ln in md.splitlines() if ln.startswith("| `tune.space`"))
    assert "{grid\\|choice" in line and line.count(" | ") == 3  # a | in a cell is escaped
    assert "&lt;output_dir>" in md  # not an HTML tag


def test_readme_links_the_reference():
    assert "](docs/config.md)" in (ROOT / "README.md").read_text()


def test_markdown_flag_is_for_docs(capsys):
    assert main(["config", "show", "--markdown"]) == 2
    assert "--markdown goes with `ensemble-kd config docs`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def listed_losses() -> dict[str, list[str]]:
    """`ensemble-kd list losses`: loss name -> its lines."""
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["list", "losses"]) == 0
    blocks: dict[str, list[str]] = {}
    for ln in buf.getvalue().splitlines():
        if not ln.startswith(" "):
            blocks[ln.split()[0]] = []
        else:
            blocks[list(blocks)[-1]].append(ln.strip())
    return blocks


def test_list_losses_shows_every_option_with_its_default(listed_losses):
    assert set(listed_losses) == set(LOSSES.names())
    for name, lines in listed_losses.items():
        assert lines[0] == "options (distill.losses[].kwargs):", (name, lines)
        shown = dict(ln.split(": ", 1) for ln in lines[1:])
        assert list(shown) == list(loss_options(name)), name
        for opt, default in loss_options(name).items():
            assert shown[opt].endswith(f" = {config_docs.yaml_value(default)}"), (name, opt, shown[opt])
    assert "temperature: float (> 0) = 4.0" in listed_losses["kd"]
    assert "reduction: 'mean_probs' | 'per_teacher' = mean_probs" in listed_losses["kd"]
    assert "label_smoothing: float (>= 0, <= 1) = 0.0" in listed_losses["ce"]
    assert "num_negatives: int (> 0) = 16384" in listed_losses["crd"]


def test_yaml_value_writes_defaults_as_yaml():
    assert [config_docs.yaml_value(v) for v in (None, True, 0.07, "auto", (1, 2), {}, "")] == \
        ["null", "true", "0.07", "auto", "[1, 2]", "{}", "''"]
    assert to_dict(ExperimentConfig())["distill"]["epochs"] == 30  # (the row says 30)
    assert next(r.default for r in config_docs.fields() if r.path == "distill.epochs") == "30"
