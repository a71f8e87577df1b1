"""The layering contract (pyproject.toml, [tool.importlinter]) holds: modules import only downward,
the stages do not import each other, losses import no stage. Checked by import-linter itself."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "Layers only import downward KEPT" in r.stdout, r.stdout


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py (and fixtures in conftest.py), never in a test module."""
    pattern = re.compile(r"^\s*(from|import)\s+(tests\.)?test_\w+", re.M)
    offenders = [p.name for p in (ROOT / "tests").glob("test_*.py") if pattern.search(p.read_text())]
    assert offenders == []


ORCHESTRATION = ["cli.py", "orchestration/pipeline.py", "orchestration/sweep.py", "orchestration/plan.py", "orchestration/report.py", "training/launch.py", "training/loop.py", "stages"]


def test_orchestration_functions_stay_short():
    """No function of the orchestration layer is over 50 lines (a newcomer reads each in one screen)."""
    long = []
    for entry in ORCHESTRATION:
        path = ROOT / "ensemble_kd" / entry
        for p in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for n in ast.walk(ast.parse(p.read_text())):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 50:
                    long.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def test_the_package_top_holds_only_the_command_and_the_layer_folders():
    """Every module lives in the folder of its layer: no module at the top of the package but the
    command (cli.py) and __init__.py, so the layout states the layers (no alias of an old path)."""
    top = sorted(p.name for p in (ROOT / "ensemble_kd").glob("*.py"))
    assert top == ["__init__.py", "cli.py"]


def test_the_output_folders_names_are_spelled_only_in_layout():
    """core/layout.py is the one home of the output folder's names: no other module spells one in a
    path (docstrings, comments, help texts and messages may name them)."""
    names = {"ray_results", "mlartifacts", "summary.json", "summary.png", "mlflow.db", "student.pt", "selections",
             "students", "exports"}
    found = []
    for p in sorted((ROOT / "ensemble_kd").rglob("*.py")):
        if p.name == "layout.py":
            continue
        tree = ast.parse(p.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            # a path piece has no spaces (help texts and messages may name the folders)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and " " not in n.value.strip():
                hit = {w for w in names if w in re.split(r"[/\s'\"{}()]", n.value)}
                if hit:
                    found.append(f"{p.relative_to(ROOT)}:{n.lineno} {sorted(hit)}")
    assert found == []
