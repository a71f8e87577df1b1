"""Build ``.gpu-wheels/``: the wheels that a lent GPU machine's image lacks for ``bench/gpu_e2e.sh``.

The GPU machine (its image: Python 3.12, torch with CUDA, numpy, pandas, pyarrow, ... but no Ray,
MLflow, FAISS or pydantic) reaches no package registry; what it lacks travels with the working
tree as wheels (the ``carry`` of the device call, at most 64 MiB together with the tree). This
script, run here where pip reaches the registry:

1. starts from the packages ensemble-kd needs there: ``ray[train,tune]``, ``mlflow-skinny`` with
   ``sqlalchemy`` and ``alembic`` (MLflow's SQLite store), ``faiss-cpu``, ``pydantic``, each at the
   version installed here (the one the suite runs), else the newest that pip finds;
2. downloads each with ``pip download --no-deps --only-binary=:all:`` for CPython 3.12 on
   manylinux x86-64, reads its ``Requires-Dist`` (markers evaluated for that interpreter, only the
   extras asked for) and adds every requirement the image does not already hold (``IMAGE_HAS``,
   the image's package list as read on 2026-11-17), until nothing is missing;
3. repacks Ray's wheel without its Java jar (``ray/jars/``, 31 MiB compressed, only for Java
   workers), its dashboard's web client, RLlib, Serve and ``ray.llm`` (``DROP``), and with its three large binaries (``gcs_server``, ``raylet``, ``_raylet.so``) stripped
   of their symbol tables (``strip --strip-unneeded``; 29 MB of 114), their RECORD lines rewritten;
   and every wheel's members recompressed with LZMA (pip installs them: Python's ``zipfile`` reads
   them; ``--no-lzma`` keeps deflate), so the folder fits beside the working tree: 82 MiB as
   downloaded (jar dropped), 52 MiB repacked (Ray 27 MiB, faiss-cpu 9, SQLAlchemy 3.8, MLflow 3.7,
   cryptography 3.4);
4. prints one JSON document: the wheels, their MiB, the working tree's MiB and whether both fit a call.

    python bench/gpu_wheels.py [--dest .gpu-wheels] [--no-lzma] [--python-version 3.12]

About 4 minutes on 2 cores (the LZMA pass is most of it). ``--python-version 3.11`` builds the
same set for this machine's Python, to try the repacked wheels here (``pip install --target``).

On the GPU machine ``bench/gpu_e2e.sh`` installs them (``pip install --no-index --no-deps --target``)
before anything imports them; docs/results.md ("The end-to-end GPU check") gives the device call.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64.0  # what one device call carries: the working tree and the carried paths together

# What ensemble-kd imports on the GPU machine that its image lacks (with the extras it uses).
ROOTS: dict[str, tuple[str, ...]] = {
    "ray": ("train", "tune"),
    "mlflow-skinny": (),
    "sqlalchemy": (),
    "alembic": (),
    "faiss-cpu": (),
    "pydantic": (),
}

# The GPU image's packages ('cuda' image, as its machine listed them on 2026-11-17): never carried.
IMAGE_HAS = {canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()}

# CPython 3.12 on Linux x86-64: how the requirements' markers are read.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "implementation_version": "3.12.3", "platform_release": "", "platform_version": ""}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64"]
# Members dropped from a wheel (prefixes): Ray's Java jar, its dashboard's web client (the commands
# start Ray without the dashboard), and RLlib, Serve and Ray's LLM library, which nothing here imports
# (Tune, Train and Ray's core import none of them at module level; only examples and ray.data.llm do).
DROP = {"ray": ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/llm/")}
STRIP = {"ray": ("ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet", "ray/_raylet.so")}
PY = "3.12"  # the GPU image's Python (--python-version changes it)


def local_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def download(spec: str, dest: Path) -> Path:
    """One wheel for CPython 3.12 / manylinux x86-64, no dependencies; its path."""
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PY,
           "--implementation", "cp", "--abi", "cp" + PY.replace(".", ""), "--abi", "abi3", "--abi", "none", "-q",
           "-d", str(dest), spec]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    r = subprocess.run(cmd, capture_output=True, text=True)  # pip's notes on this machine's local indexes: noise
    if r.returncode:
        sys.exit(f"gpu_wheels: pip download {spec} failed:\n{r.stdout}{r.stderr}")
    new = set(dest.glob("*.whl")) - before
    if new:
        return new.pop()
    name = canonicalize_name(Requirement(spec).name)  # already there from an earlier run
    return next(w for w in dest.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name)


def requirements(wheel: Path, extras: tuple[str, ...]) -> list[Requirement]:
    """The wheel's Requires-Dist that apply to CPython 3.12 on Linux with ``extras``."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        env = {**TARGET_ENV, "python_version": PY, "python_full_version": PY + ".3"}
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def stripped(data: bytes) -> bytes:
    """An ELF file's bytes without its symbol tables (``strip --strip-unneeded``)."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "elf"
        f.write_bytes(data)
        subprocess.run(["strip", "--strip-unneeded", str(f)], check=True)
        return f.read_bytes()


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def repack(wheel: Path, drop: tuple[str, ...], strip: tuple[str, ...], lzma: bool) -> None:
    """Rewrite ``wheel`` in place without the members under ``drop``, the members ``strip`` stripped,
    RECORD saying so, every member LZMA-compressed with ``lzma``."""
    tmp = wheel.with_suffix(".tmp")
    method = zipfile.ZIP_LZMA if lzma else zipfile.ZIP_DEFLATED
    changed: dict[str, str] = {}  # member -> its new RECORD line
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", method) as dst:
        infos = [i for i in src.infolist() if not i.filename.startswith(drop)] if drop else src.infolist()
        record = next(i for i in infos if i.filename.endswith(".dist-info/RECORD"))
        for info in [i for i in infos if i is not record] + [record]:  # RECORD last: it names the changes
            data = src.read(info)
            if info.filename in strip:
                data = stripped(data)
                changed[info.filename] = record_line(info.filename, data)
            if info is record:
                lines = data.decode().splitlines(keepends=True)
                data = "".join(changed.get(ln.split(",", 1)[0], ln) for ln in lines
                               if not (drop and ln.startswith(drop))).encode()
            new = zipfile.ZipInfo(info.filename, info.date_time)
            new.external_attr, new.compress_type = info.external_attr, method
            dst.writestr(new, data)
    tmp.replace(wheel)


def tree_mib() -> float:
    """MiB of what a device call sends besides the carried paths: tracked and untracked, not ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return sum((ROOT / f).stat().st_size for f in out.split("\0") if f and (ROOT / f).is_file()) / 2**20


def main() -> None:
    global PY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(ROOT / ".gpu-wheels"), help="the folder to (re)build (default: .gpu-wheels)")
    ap.add_argument("--no-lzma", action="store_true", help="keep the wheels' deflate (larger; quicker to build)")
    ap.add_argument("--python-version", default=PY, help="the target's Python (default 3.12, the GPU image's)")
    args = ap.parse_args()
    PY = args.python_version
    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    todo = [(n, ex, None) for n, ex in ROOTS.items()]  # (name, extras, requirement from a parent)
    got: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="ekd-wheels-") as tmp:
        while todo:
            name, extras, req = todo.pop(0)
            key = canonicalize_name(name)
            if key in got or key in IMAGE_HAS:
                continue
            ver = local_version(name)
            spec = f"{name}=={ver}" if ver and (req is None or req.specifier.contains(ver, prereleases=True)) \
                else (str(req.name) + str(req.specifier) if req is not None else name)
            wheel = download(spec, Path(tmp))
            got[key] = wheel
            for r in requirements(wheel, extras):
                todo.append((r.name, tuple(sorted(r.extras)), r))
        jobs = []
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # the LZMA pass, a wheel per process
            for key, wheel in got.items():
                target = dest / wheel.name
                shutil.copy2(wheel, target)
                if key in DROP or key in STRIP or not args.no_lzma:
                    jobs.append(pool.submit(repack, target, DROP.get(key, ()), STRIP.get(key, ()), not args.no_lzma))
            for j in jobs:
                j.result()
    sizes = {w.name: round(w.stat().st_size / 2**20, 2) for w in sorted(dest.glob("*.whl"))}
    total, tree = sum(sizes.values()), tree_mib()
    print(json.dumps({"dest": str(dest), "wheels": sizes, "wheels_mib": round(total, 2), "tree_mib": round(tree, 2),
                      "call_mib": round(total + tree, 2), "fits_one_call": total + tree < LIMIT_MIB - 1}, indent=2))
    if total + tree >= LIMIT_MIB - 1:
        sys.exit(f"gpu_wheels: {total:.1f} MiB of wheels + {tree:.1f} MiB of working tree is over what one device call "
                 f"carries ({LIMIT_MIB:.0f} MiB)")


if __name__ == "__main__":
    main()
