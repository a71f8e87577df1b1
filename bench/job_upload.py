"""What `ray job submit --working-dir .` uploads from a checkout that holds a virtual environment
and an output folder, packed by Ray's own packager (the zip a submission sends to the cluster).

    python3 bench/job_upload.py                  # a real venv (with pip) and a 200 MB output folder
    python3 bench/job_upload.py --output-mb 5    # smaller

Two figures: with the checkout's .gitignore honoured (what Ray does by default) and without it
(what a checkout whose .gitignore misses venvs and outputs uploads). Ray refuses a package over
512 MiB; the target is under 20 MB.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ray._private.runtime_env.packaging import create_package  # Ray's packager: what a submission uploads

REPO = Path(__file__).resolve().parents[1]
RAY_DEFAULT_EXCLUDES = [".git"]  # Ray 2.60 leaves .git out of every working dir
QUIET = logging.getLogger("ekd.bench.job_upload")
QUIET.setLevel(logging.ERROR)  # the packager's per-file lines


def checkout(dest: Path) -> Path:
    """The repository's tracked files (as a clone has them, with this tree's edits) in ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def add_clutter(root: Path, output_mb: int, venv: bool) -> dict[str, int]:
    """What a user's checkout holds beside the code: a virtual environment, an output folder
    (random bytes: a store of teachers, shards and MLflow does not compress) and caches."""
    if venv:
        subprocess.run([sys.executable, "-m", "venv", str(root / ".venv")], check=True)
    out = root / "outputs" / "shards" / "t__train__0"
    out.mkdir(parents=True)
    with open(out / "part-00000.arrow", "wb") as f:
        for _ in range(output_mb):
            f.write(os.urandom(1 << 20))
    (root / "outputs" / "mlflow.db").write_bytes(os.urandom(1 << 20))
    (root / "ensemble_kd" / "__pycache__").mkdir(exist_ok=True)
    (root / "ensemble_kd" / "__pycache__" / "x.cpython-311.pyc").write_bytes(os.urandom(1 << 18))
    return {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (root / ".venv", root / "outputs")
            if p.exists()}


def package_mb(root: Path, include_gitignore: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "pkg.zip"
        create_package(str(root), target, include_gitignore=include_gitignore, excludes=list(RAY_DEFAULT_EXCLUDES),
                       logger=QUIET)
        return target.stat().st_size / 1e6


def measure(output_mb: int = 200, venv: bool = True, gitignore: Path | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ekd-upload-") as tmp:
        root = checkout(Path(tmp) / "checkout")
        if gitignore is not None:  # another version's, to compare
            shutil.copy(gitignore, root / ".gitignore")
        clean = package_mb(root, include_gitignore=True)
        sizes = add_clutter(root, output_mb, venv)
        return {"checkout_mb": round(clean, 2),
                "clutter_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
                "with_gitignore_mb": round(package_mb(root, include_gitignore=True), 2),
                "without_gitignore_mb": round(package_mb(root, include_gitignore=False), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-mb", type=int, default=200, help="size of the output folder put in the checkout")
    ap.add_argument("--no-venv", action="store_true", help="leave the virtual environment out")
    ap.add_argument("--gitignore", type=Path, help="use this .gitignore in the checkout (e.g. an older version's)")
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.output_mb, not a.no_venv, a.gitignore), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
