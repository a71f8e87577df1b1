"""A training run's state file: everything a restarted or resumed run continues from.

``<run folder>/state.pt`` (or a Ray Train checkpoint folder's) holds the module (student, heads,
memories), optimiser, scheduler, RNG states, epoch, metric history, config and timings, in a
format that loads with ``torch.load(weights_only=True)``: tensors and plain containers only (an
output folder is often shared, and a file from it must never run code). The RNG states are read
and restored on the CPU, whatever device the run is on (torch, numpy and CUDA take them as CPU
tensors only).
"""
from __future__ import annotations

import pickle
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble_kd.core.config import to_dict
from ensemble_kd.core.errors import ProjectError
from ensemble_kd.core.files import atomic_torch_save
from ensemble_kd.core.shared_folder import not_shared


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": py_gauss},
            # only a process that has used CUDA has CUDA RNG states worth saving; asking for them
            # would open a CUDA context (and take GPU memory) in a CPU-only trial
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor inside ``obj`` (dicts, lists, tuples) moved to ``device``."""
    if device.type == "cpu":
        return obj
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states; each RNG takes its state as a CPU tensor only."""
    torch.set_rng_state(s["torch"].cpu())
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = s["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if s.get("cuda") is not None and torch.cuda.is_initialized():  # a run on CUDA (its module is there by now)
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


STATE_FILE = "state.pt"


class StateFileError(RuntimeError, ProjectError):
    """A training state file that cannot be loaded safely (not weights-only, damaged)."""


def last_of(history: Sequence[dict[str, Any]], key: str) -> Any:
    """The latest value of metric ``key`` in a run's history (None where no epoch has it)."""
    return next((h[key] for h in reversed(history) if key in h), None)


def load_state(folder: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The training state in ``folder/state.pt``, loaded with ``weights_only=True``: tensors and
    plain containers only. A file that needs more (a crafted pickle, or a state written by a
    version before 0.3) is refused, never executed. Its tensors go to ``device``, except the RNG
    states: torch, numpy and CUDA take those as CPU tensors only (read on the CPU, then moved)."""
    path = Path(folder) / STATE_FILE
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v if k == "rng" else _to_device(v, torch.device(device)) for k, v in st.items()}
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise StateFileError(f"refusing to load training state {path}: it is not a weights-only ensemble-kd state "
                             f"(it would need code execution to load: {first}); if you did not write it, someone "
                             f"else may have; delete the run's folder to start that run over") from None
    except FileNotFoundError:
        # written by the run's rank 0, perhaps on another node: a folder this node does not share, not a bad file
        raise not_shared(path, Path(folder), "the training state") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise StateFileError(f"cannot read training state {path}: {e}; delete the run's folder to start that run over") from None


def save_state(path: Path, w: Any) -> None:
    """The loop worker ``w``'s training state after its last epoch (``w.history[-1]``), weights-only loadable;
    ``timings``: seconds spent so far per part (this save's own time not yet in)."""
    atomic_torch_save({"module": w.module.state_dict(), "optimizer": w.opt.state_dict(), "scheduler": w.sched.state_dict(),
                       "epoch": len(w.history) - 1, "rng": rng_state(), "history": w.history, "config": to_dict(w.cfg),
                       "timings": dict(w.timings)}, path)


def latest_state_dir(run_dir: str | Path) -> Path | None:
    """The folder of the newest training state of a run (``<run_dir>/state.pt`` written in local
    mode, or a Ray Train ``checkpoint_*`` folder), or None."""
    cands = [f.parent for f in (Path(run_dir) / STATE_FILE, *Path(run_dir).glob(f"checkpoint_*/{STATE_FILE}")) if f.is_file()]
    return max(cands, key=lambda f: (f / STATE_FILE).stat().st_mtime_ns) if cands else None


def module_part(state: dict[str, Any], prefix: str = "student.") -> dict[str, torch.Tensor]:
    """The weights of one part of the DistillModule (the student) out of a training state."""
    return {k[len(prefix):]: v for k, v in state["module"].items() if k.startswith(prefix)}
