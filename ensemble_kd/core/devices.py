"""Device choice, AMP and seeding: the only place that knows about CUDA."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def resolve_device(pref: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu. An explicit device that is absent is an error."""
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device (set device: auto or cpu)")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was asked for, but it is not available (set device: auto or cpu)")
    return torch.device(pref)


def stage_device(gpus: float, field: str) -> torch.device:
    """Where a Ray task, trial or worker that asked Ray for ``gpus`` GPUs runs: the GPU Ray gave it
    (``cuda:0``, the first it sees) when it asked for one, else the CPU. The resource fields
    (``teachers[i].use_gpu``, ``embed.gpus_per_actor``, ``distill.use_gpu``) are the one rule for
    where each stage runs; a process that asked for none has the GPUs hidden from it
    (``raycluster.HIDE_GPUS``) and never opens a CUDA context. ``field`` names the setting in the error."""
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{field} asks for a GPU, but this process sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return torch.device("cuda", 0)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked for (no loss scaler needed); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    g = torch.Generator()
    g.manual_seed(seed)
    return g
