"""Collectives that are no-ops at world size 1 (torch.distributed not initialised).

Every function works with gloo (CPU tensors) and nccl (CUDA tensors). With nccl a CPU tensor is
moved to the current CUDA device for the collective and the result is moved back, so callers
never need to know the backend. Every rank must call the same collectives in the same order.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where the collective must run: nccl needs CUDA tensors, gloo takes either."""
    if tdist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _to_wire(t: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """Bools travel as uint8 (not every backend reduces/gathers bool)."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8), torch.bool
    return t, t.dtype


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order.

    ``t``: (n_r, ...) where n_r may differ per rank (the trailing dims and dtype must match).
    Returns (sum_r n_r, ...) on ``t``'s device. Sizes are gathered first, then every rank pads
    to the largest size so the collective sees equal shapes, and the padding is dropped.
    """
    ws = world_size()
    if ws == 1:
        return t
    out_device = t.device
    dev = _comm_device(t)
    x, dtype = _to_wire(t.contiguous())
    x = x.to(dev)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    tdist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    n_max = max(counts)
    if x.shape[0] < n_max:
        pad = x.new_zeros((n_max - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)  # (n_max, ...)
    parts = [torch.empty_like(x) for _ in range(ws)]
    tdist.all_gather(parts, x)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)  # (sum n_r, ...)
    return out.to(device=out_device, dtype=dtype)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` is left untouched). Integer inputs come
    back as float32."""
    ws = world_size()
    if ws == 1:
        return t.clone()
    out_device = t.device
    x = t.detach().clone()
    if not x.is_floating_point():
        x = x.float()
    x = x.to(_comm_device(x))
    tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return (x / ws).to(out_device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank. Fills ``t`` in place and returns it."""
    if world_size() == 1:
        return t
    x, dtype = _to_wire(t.contiguous())
    x = x.to(_comm_device(x))
    tdist.broadcast(x, src=src)
    with torch.no_grad():
        t.copy_(x.to(device=t.device, dtype=dtype))
    return t
