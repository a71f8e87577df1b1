"""Small helpers shared by the per-teacher losses (not a loss; nothing registered here)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def module_keys(loss: str, names: list[str]) -> dict[str, str]:
    """teacher name -> ``nn.ModuleDict``/``ParameterDict`` key (keys cannot contain '.')."""
    keys = {n: n.replace(".", "_") for n in names}
    if len(set(keys.values())) != len(keys):
        raise ValueError(f"{loss}: teacher names collide once '.' is replaced by '_': {names}")
    return keys


def as_float(t: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 (autocast) -> float32, so every loss is computed in at least float32;
    float32/float64 pass through (golden tests run in float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def weighted_teacher_sum(weights: dict[str, float], term: Callable[[str], torch.Tensor],
                         like: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * term(k) over the teachers, skipping zero weights (their term is not even
    computed). ``like`` gives the device of the zero a run with no weighted teacher returns."""
    total = like.new_zeros((), dtype=torch.float32 if like.dtype != torch.float64 else torch.float64)
    for name, w in weights.items():
        if w == 0.0:
            continue
        total = total + w * term(name)
    return total
