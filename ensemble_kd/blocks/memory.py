"""CRD memories: the student-side momentum memory and FAISS-backed teacher-side negative sampling.

- :class:`MomentumMemory` holds one L2-normalised vector per train row (the student side of CRD,
  Tian et al., ICLR 2020, reference ``ContrastMemory``). Updates are all-gathered first and then
  applied identically on every worker, so the memory stays bit-identical across DDP workers.
- :class:`NegativeSampler` draws negatives over the rows of the train shards: ``uniform`` (any
  row but the anchor), ``class-aware`` (rows of other classes only; the CRD paper's choice) or
  ``hard`` (nearest neighbours of the anchor's teacher embedding in other classes, found with a
  FAISS ``IndexFlatIP`` on L2-normalised embeddings).

Per-anchor draws (``per_sample``) and CRD's ``relax`` positives are counter-based: each index is a
hash (:func:`mix64`, splitmix64's finaliser in wrapping int64 arithmetic) of (seed, step, anchor,
draw index), computed where the step runs, for the whole batch at once, with no generator state
and no trip to the host. Integer arithmetic is exact on every device, so a CPU run and a GPU run
draw the same indices (a CUDA generator's stream can differ between GPU models; this cannot).
Without replacement whenever N <= the anchor's eligible rows e, at any size: draw j is the image
of j under a keyed permutation of [0, e) (a random rotation, then :data:`SHUFFLE_ROUNDS` rounds of
the swap-or-not shuffle, Hoang, Morris and Rogaway, CRYPTO 2012), so the N draws are distinct and
each is uniform over the e rows; O(N) per anchor and no (B, M) tensor. Anchors with fewer eligible
rows than N draw with replacement (independent uniform draws).

Shared negatives (``per_sample: false``, the embedded default's) are drawn on the CPU from
``(seed, step)`` generators (a ``torch.Generator``; NumPy's PCG64 for very large banks) and moved
to the anchors' device: N indices a step, the same on every worker.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd.core import dist
from ensemble_kd.core.rows import full

SAMPLER_MODES = ("uniform", "class-aware", "hard")


SPARSE_DRAW = 64
"""Shared negatives: with more than this many rows per draw (M > 64 N: a 1M-row bank and N = 16384)
the N distinct rows are drawn in O(N) (NumPy's set-based Floyd draw) instead of taking the first N
of a permutation of all M rows, which costs O(M) a step (``bench/data_scale.py``; docs/results.md).
Below it the permutation is kept: the draws, hence every result, of banks
that size are unchanged."""


SHUFFLE_ROUNDS = 12
"""Swap-or-not rounds of the per-anchor permutation. The rotation before them already makes every
draw exactly uniform over the anchor's eligible rows; each round pairs the rows by a keyed
reflection and swaps each pair on a keyed bit, so after r rounds the N draws are the union of up to
2^r keyed reflections of scattered pieces of one block. At 12 the gaps between the drawn rows are
those of a random subset (500 of 10,000: mean 20, sd 19.4 against 19.5, largest 229 against about
210; at 8 rounds the largest was 473), tests/test_counter_draws.py."""

_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's Weyl increment (2^64 / golden ratio)
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's finaliser constants
_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic, any device): a bijection of
    64-bit words in which every output bit depends on every input bit. Equal to
    :func:`mix64_int` word for word."""
    x = x ^ _shr(x, 30)  # a new tensor: the ops below work in place on it (no fresh (B, N) buffer each)
    x.mul_(_i64(_MUL1))
    x.bitwise_xor_(_shr(x, 27)).mul_(_i64(_MUL2))
    return x.bitwise_xor_(_shr(x, 31))


def mix64_int(x: int) -> int:
    """:func:`mix64` on a Python int (the host's keys), the result as a signed 64-bit int."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return _i64(x ^ (x >> 31))


def counter_keys(seed: int, step: int, stream: int, anchors: torch.Tensor) -> torch.Tensor:
    """anchors (B,) int64 -> (B,) int64 keys of (seed, step, stream, anchor), on anchors' device:
    distinct anchors get distinct keys (mix64 is a bijection). The host part is plain ints."""
    base = mix64_int(mix64_int(mix64_int(seed) + step * _GAMMA) + stream * _GAMMA)
    return mix64(anchors * _i64(_GAMMA) + base)  # (B,)


def counter_uniform(keys: torch.Tensor, n: int, bound: torch.Tensor) -> torch.Tensor:
    """keys (B,), bound (B,) >= 1 -> (B, n) int64, draw j of row b uniform in [0, bound_b),
    independent across j: two draws per hash (its two 32-bit halves, each scaled by the
    multiply-shift, bias < bound / 2^32)."""
    half = (n + 1) // 2
    j = torch.arange(1, half + 1, device=keys.device, dtype=torch.int64) * _i64(_GAMMA)  # (H,) Weyl counters
    h = mix64(keys[:, None] + j)  # (B, H) splitmix64's stream of each key
    # the halves as int32 words, a view (little-endian on every device torch runs on), shifted to [0, 2^32)
    u = h.view(torch.int32)[:, :n].to(torch.int64).add_(1 << 31)  # (B, n)
    return u.mul_(bound[:, None]).bitwise_right_shift_(32)  # (B, n) in [0, bound); u * bound < 2^63 for bound < 2^31


def counter_permutation(keys: torch.Tensor, n: int, bound: torch.Tensor, rounds: int = SHUFFLE_ROUNDS) -> torch.Tensor:
    """keys (B,), bound (B,) >= n -> (B, n) int64: entry j of row b is pi_b(j), pi_b a keyed
    permutation of [0, bound_b), so a row's n entries are distinct and each is uniform over
    [0, bound_b). pi = swap-or-not rounds after a uniform rotation (module docstring)."""
    e = bound[:, None]  # (B, 1)
    k = counter_uniform(keys, 2 * rounds + 1, bound)  # (B, 1+2R) the rotation and each round's partner key
    bits = mix64(keys + _i64(0x5851F42D4C957F2D))[:, None] + torch.arange(
        rounds, device=keys.device, dtype=torch.int64) * _i64(_GAMMA)  # (B, R) each round's bit key
    x = torch.arange(n, device=keys.device, dtype=torch.int64)[None, :] + k[:, :1]  # (B, n) rotated
    x = x - e * (x >= e)  # (B, n) in [0, e)
    for r in range(rounds):
        xp = k[:, 1 + r: 2 + r] - x  # (B, n) the partner K_r - x, in (-e, e)
        xp = xp + e * (xp < 0)  # mod e
        y = torch.maximum(x, xp)  # (B, n) the pair's name, the same for both members
        h = (y ^ bits[:, r: r + 1]) * _i64(_MUL1)
        swap = ((h ^ _shr(h, 32)) * _i64(_MUL2)) < 0  # (B, n) the pair's keyed bit (its top bit)
        x = torch.where(swap, xp, x)
    return x


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python hash seeds)."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def memory_update(rows: torch.Tensor, values: torch.Tensor, momentum: float) -> torch.Tensor:
    """CRD's momentum update of memory rows, the reference ``ContrastMemory``'s: rows (U, D) the
    memory's current rows, values (U, D) the new features -> (U, D)
    normalize(momentum * rows + (1 - momentum) * values), to be written back (no gradient: the
    memory holds constants). Public as ``ensemble_kd.losses.functional.memory_update``; it lives
    here because the memory (a lower layer than the losses) applies it."""
    with torch.no_grad():
        return F.normalize(rows * momentum + values.to(rows) * (1.0 - momentum), dim=1)


class MomentumMemory(nn.Module):
    """One L2-normalised vector per train row, updated with momentum (student side of CRD).

    ``memory``: (M, D) float32 buffer (saved in ``state_dict``), initialised as in CRD's reference
    (uniform in [-stdv, stdv], stdv = 1/sqrt(D/3)) from ``seed`` (so identical on every worker),
    then L2-normalised.
    """

    def __init__(self, num_rows: int, dim: int, momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"memory momentum must be in [0, 1], got {momentum}")
        self.num_rows, self.dim, self.momentum = int(num_rows), int(dim), float(momentum)
        stdv = 1.0 / math.sqrt(dim / 3)
        g = torch.Generator().manual_seed(int(seed))
        mem = torch.rand(num_rows, dim, generator=g).mul_(2 * stdv).add_(-stdv)  # (M, D)
        self.register_buffer("memory", F.normalize(mem, dim=1))

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (...) int64 -> (..., D) rows of the memory (no gradient flows into the memory)."""
        return self.memory[idx.to(self.memory.device)].detach()

    def table(self) -> torch.Tensor:
        """(M, D) a copy of every row, what ``gather(arange(M))`` gives, as one memcpy instead of an
        indexed read (a copy: the update after the loss writes the buffer in place, and autograd
        keeps what the scores were computed from)."""
        return self.memory.detach().clone()

    @torch.no_grad()
    def update(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        """``mem[idx] = normalize(momentum * mem[idx] + (1 - momentum) * values)`` on every worker.

        idx (B,) int64, values (B, D). The (idx, values) of all workers are first all-gathered
        in rank order (``dist.all_gather_cat``), then the same update is applied everywhere.
        Duplicate rows in one update (within a batch or across workers): the LAST occurrence in
        the gathered rank order wins (the row gets one momentum step, towards that value);
        this is deterministic, unlike ``index_copy_`` with duplicates.
        """
        idx = idx.reshape(-1).to(self.memory.device, torch.int64)  # (B,)
        values = values.detach().reshape(idx.shape[0], self.dim).to(self.memory)  # (B, D)
        idx = dist.all_gather_cat(idx)  # (K,) K = sum of the workers' B
        values = dist.all_gather_cat(values)  # (K, D)
        if idx.numel() == 0:
            return
        uniq, inv = torch.unique(idx, return_inverse=True)  # (U,), (K,)
        pos = torch.arange(idx.shape[0], device=idx.device)  # (K,)
        last = torch.full_like(uniq, -1).scatter_reduce(0, inv, pos, reduce="amax")  # (U,)
        rows, vals = idx[last], values[last]  # (U,), (U, D)
        self.memory[rows] = memory_update(self.memory[rows], vals, self.momentum)  # (U, D)

    def checksum(self) -> str:
        """sha256 of the buffer's bytes (equal on every worker when the memories agree)."""
        return hashlib.sha256(self.memory.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, momentum={self.momentum}"


def _faiss() -> Any:
    """FAISS, imported on first use: only the ``hard`` negatives and the GPU check need it, and
    importing it costs about 0.6 s and logs its loader's INFO lines in every Ray worker."""
    import faiss

    return faiss


def faiss_gpu_problem(here: bool = True) -> str | None:
    """Why FAISS cannot search on a GPU (None: it can): a faiss-cpu build has no
    ``StandardGpuResources``; with ``here``, a GPU build that sees no GPU in this process."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return f"this faiss ({getattr(faiss, '__version__', '?')}) is a CPU build: install faiss-gpu, or set it false"
    if here and faiss.get_num_gpus() < 1:
        return "faiss sees no GPU in this process (ask for one: distill.use_gpu), or set it false"
    return None


def check_faiss_gpu() -> None:
    """``use_gpu_faiss`` asked for: an error, before any index is built, where it cannot be had
    (never a silent CPU index)."""
    problem = faiss_gpu_problem()
    if problem is not None:
        raise ValueError(f"crd: use_gpu_faiss is set, but {problem}")


class NegativeSampler:
    """Negatives over the M rows of the train shards for CRD (teacher side).

    Args:
        teacher_emb: (M, d) teacher embeddings (tensor or array; used by ``hard`` mode).
        labels: (M,) int class of each row.
        mode: ``uniform`` | ``class-aware`` | ``hard``.
        num_negatives: N per anchor (may exceed the eligible rows: then drawn with replacement).
        per_sample: True -> (B, N) negatives per anchor; False -> (N,) shared by the batch
            (much cheaper) drawn from all rows (``hard``: from the union of the anchors' hard
            pools), with ``valid`` masking what does not count for each anchor.
        seed: base seed; draws depend only on (seed, step, anchors).
        hard_pool: ``hard`` mode: how many nearest other-class neighbours per row to keep.
        use_gpu: put the FAISS index on the GPU; an error (before any search) where this faiss has
            no GPU support or sees no GPU.

    Per-sample draws are without replacement for every anchor with N <= its eligible rows, and
    with replacement for the others, counter-based on the anchors' device (see the module docstring).

    ``sample(anchor_idx (B,), step) -> (neg_idx (B, N) | (N,), valid (B, N) bool)``: ``valid``
    always excludes the anchor itself, and in ``class-aware``/``hard`` modes the anchor's class.
    """

    def __init__(self, teacher_emb, labels, mode: str = "class-aware", num_negatives: int = 16384,
                 per_sample: bool = True, seed: int = 0, hard_pool: int = 512, use_gpu: bool = False) -> None:
        if mode not in SAMPLER_MODES:
            raise ValueError(f"unknown negatives mode {mode!r}; known: {', '.join(SAMPLER_MODES)}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1).cpu()  # (M,)
        self._tables_by_device: dict[str, dict[str, torch.Tensor]] = {}  # device -> the index tables there (tables_on)
        self.num_rows = M = int(self.labels.shape[0])
        if M < 2:
            raise ValueError(f"negative sampling needs at least 2 rows, got {M}")
        self.mode, self.num_negatives, self.per_sample = mode, int(num_negatives), bool(per_sample)
        self.seed = int(seed)
        # per-class index tables: rows sorted by class, each class a contiguous run
        self.order = torch.argsort(self.labels, stable=True)  # (M,) rows grouped by class
        self.rank_in_order = torch.empty_like(self.order)
        self.rank_in_order[self.order] = torch.arange(M)  # (M,) position of each row in `order`
        classes, counts = torch.unique(self.labels, return_counts=True)  # (C,), (C,)
        self.class_start = torch.zeros(int(self.labels.max()) + 1 if M else 0, dtype=torch.int64)
        self.class_count = torch.zeros_like(self.class_start)
        starts = torch.cumsum(counts, 0) - counts
        self.class_start[classes], self.class_count[classes] = starts, counts
        if mode != "uniform" and int(counts.max()) == M:
            raise ValueError(f"negatives mode {mode!r} needs at least two classes; all {M} rows are one class")
        self.index = None
        self.hard_pool = self.hard_len = None
        if mode == "hard":
            self._build_hard(teacher_emb, int(hard_pool), use_gpu)
        # the fewest and most rows an anchor may draw from, known here so that a step never reads
        # the device to choose between drawing with and without replacement
        elig = self.eligible(torch.arange(M)) if per_sample else torch.tensor([M - 1])  # (M,)
        self.min_eligible, self.max_eligible = int(elig.min()), int(elig.max())
        if self.min_eligible < 1:
            raise ValueError("a row has no eligible negatives (its class covers every other row)")

    # -- FAISS -----------------------------------------------------------------------------
    def _build_hard(self, teacher_emb, hard_pool: int, use_gpu: bool) -> None:
        faiss = _faiss()
        teacher_emb = full(teacher_emb)  # FAISS holds its own copy of every row anyway
        x = teacher_emb.detach().cpu().float().numpy() if torch.is_tensor(teacher_emb) else np.asarray(teacher_emb)
        x = np.array(x, dtype=np.float32, order="C", copy=True)  # normalize_L2 writes in place: never into the shard's read-only map
        if x.shape[0] != self.num_rows:
            raise ValueError(f"teacher_emb has {x.shape[0]} rows, labels {self.num_rows}")
        faiss.normalize_L2(x)
        cpu_index = faiss.IndexFlatIP(x.shape[1])
        cpu_index.add(x)
        self._cpu_index, self.index, self._gpu_res = cpu_index, cpu_index, None
        if use_gpu:
            check_faiss_gpu()
            self._gpu_res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_res, 0, cpu_index)
        M = self.num_rows
        labels = self.labels.numpy()
        P = max(1, min(hard_pool, M - 1))
        pool = np.zeros((M, P), dtype=np.int64)
        plen = np.zeros(M, dtype=np.int64)
        batch = 1024
        for start in range(0, M, batch):
            todo = np.arange(start, min(start + batch, M))  # rows of this query batch
            k = min(M, 2 * P + 1)
            while todo.size:
                # faiss GPU k is limited to 2048: search larger k on the CPU index
                index = self.index if k <= 2048 else self._cpu_index
                _, nn_idx = index.search(x[todo], k)  # (b, k) by decreasing similarity
                ok = (nn_idx >= 0) & (nn_idx != todo[:, None])
                ok &= labels[np.clip(nn_idx, 0, None)] != labels[todo][:, None]  # other classes only
                cnt = ok.sum(1)
                done = (cnt >= P) | (k >= M)
                if done.any():
                    sel = np.argsort(~ok[done], axis=1, kind="stable")[:, :P]  # first P eligible, in order
                    got = np.take_along_axis(nn_idx[done], sel, axis=1)
                    n = np.minimum(cnt[done], P)
                    got = np.where(np.arange(P)[None, :] < n[:, None], got, 0)
                    pool[todo[done]], plen[todo[done]] = got, n
                todo, k = todo[~done], min(M, 2 * k)
        self.hard_pool = torch.from_numpy(pool)  # (M, P) nearest other-class rows, nearest first
        self.hard_len = torch.from_numpy(plen)  # (M,) valid entries per row (< P only for tiny data)

    # -- sampling --------------------------------------------------------------------------
    def generator(self, step: int, stream: str = "neg") -> torch.Generator:
        return torch.Generator().manual_seed(stable_seed(self.seed, int(step), stream))

    def tables_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The index tables (labels, class runs, hard pools) on ``device``, copied there once: the
        per-sample draws and the shared negatives' mask are computed where the step runs."""
        got = self._tables_by_device.get(str(device))
        if got is None:
            names = ("labels", "order", "rank_in_order", "class_start", "class_count", "hard_pool", "hard_len")
            got = {n: getattr(self, n).to(device) for n in names if getattr(self, n) is not None}
            self._tables_by_device[str(device)] = got
        return got

    def eligible(self, anchors: torch.Tensor) -> torch.Tensor:
        """(B,) how many rows each anchor may draw from in per-sample mode, on anchors' device."""
        if self.mode == "uniform":
            return torch.full_like(anchors, self.num_rows - 1)
        t = self.tables_on(anchors.device)
        if self.mode == "class-aware":
            return self.num_rows - t["class_count"][t["labels"][anchors]]
        return t["hard_len"][anchors]

    def _positions(self, anchors: torch.Tensor, elig: torch.Tensor, step: int) -> torch.Tensor:
        """anchors (B,), their eligible counts (B,) -> (B, N) positions in [0, elig_b), counter-based
        on anchors' device: distinct within a row whenever N <= elig_b, with replacement otherwise.
        Which applies is decided from the sampler's fewest and most eligible rows (host ints),
        never by reading the device."""
        N = self.num_negatives
        keys = counter_keys(self.seed, int(step), 1, anchors)  # (B,)
        if N > self.max_eligible:  # every anchor draws with replacement
            return counter_uniform(keys, N, elig)
        if N <= self.min_eligible:  # every anchor has N distinct rows
            return counter_permutation(keys, N, elig)
        few = (elig < N)[:, None]  # (B, 1) mixed: classes of very different sizes
        return torch.where(few, counter_uniform(keys, N, elig), counter_permutation(keys, N, torch.maximum(elig, torch.full_like(elig, N))))

    def _rows(self, anchors: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Map positions (B, N) in each anchor's eligible set to row indices (B, N)."""
        a = anchors[:, None]  # (B, 1)
        if self.mode == "uniform":
            return pos.add_(pos >= a)  # skip the anchor (in place: pos is this draw's own)
        t = self.tables_on(anchors.device)
        if self.mode == "class-aware":
            c = t["labels"][a]  # (B, 1)
            start, count = t["class_start"][c], t["class_count"][c]
            return t["order"][pos + (pos >= start).long() * count]  # skip the anchor's class run
        return t["hard_pool"][a, pos]  # (B, N)

    def labels_on(self, device: torch.device) -> torch.Tensor:
        """The (M,) labels on ``device``, copied there once: the shared negatives' mask is built on
        the device the draws live on, with no copy to the host per step."""
        return self.labels if device.type == "cpu" else self.tables_on(device)["labels"]

    def valid_mask(self, anchors: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """anchors (B,), neg (B, N) or (N,) -> (B, N) bool on ``neg``'s device: which negatives count
        for which anchor."""
        anchors = anchors.to(neg.device)
        neg = neg if neg.dim() == 2 else neg[None, :].expand(anchors.shape[0], -1)
        valid = neg != anchors[:, None]
        if self.mode != "uniform":
            labels = self.labels_on(neg.device)
            valid &= labels[neg] != labels[anchors][:, None]
        return valid

    def sample(self, anchor_idx: torch.Tensor, step: int, with_valid: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """anchor_idx (B,) int64 rows -> (neg_idx (B, N) | (N,) int64, valid (B, N) bool), both
        on ``anchor_idx``'s device. Deterministic given (seed, step, anchors). ``with_valid=False``
        skips the (B, N) mask of shared negatives (valid None): a caller that scores only the
        distinct rows asks :meth:`valid_mask` for those (B, U) instead."""
        device = anchor_idx.device
        N, M = self.num_negatives, self.num_rows
        if self.per_sample:  # on the anchors' device, no host round trip
            anchors = anchor_idx.detach().reshape(-1).to(torch.int64)  # (B,)
            neg = self._rows(anchors, self._positions(anchors, self.eligible(anchors), step))  # (B, N)
            # every draw counts: the anchor, its class or its non-neighbours are never drawn
            return neg, (torch.ones_like(neg, dtype=torch.bool) if with_valid else None)
        # shared: N indices drawn on the CPU, as before (the default's results, seed for seed)
        anchors = anchor_idx.detach().reshape(-1)  # (B,)
        g = self.generator(step)
        if self.mode == "hard":  # the union of the anchors' hard pools
            anchors = anchors.to("cpu", torch.int64)  # (B,) the pools' rows, on the host
            P = self.hard_pool.shape[1]
            cand = self.hard_pool[anchors][torch.arange(P)[None, :] < self.hard_len[anchors][:, None]]
            cand = torch.unique(cand)  # (U,) sorted, so the draw is deterministic
        else:
            cand = None  # all rows
        n_cand = M if cand is None else int(cand.numel())
        if N * SPARSE_DRAW < n_cand:  # far more rows than draws: O(N) (Floyd), not a shuffle of every row
            rng = np.random.Generator(np.random.PCG64(stable_seed(self.seed, int(step), "neg-shared")))
            pick = torch.from_numpy(rng.choice(n_cand, N, replace=False, shuffle=False))  # (N,) distinct
        elif N <= n_cand:
            pick = torch.randperm(n_cand, generator=g)[:N]  # (N,) without replacement
        else:
            pick = torch.randint(n_cand, (N,), generator=g)  # (N,) with replacement
        neg = pick if cand is None else cand[pick]  # (N,)
        if not with_valid:
            return neg.to(device), None
        valid = self.valid_mask(anchors, neg)  # (B, N)
        return neg.to(device), valid.to(device)

    def sample_positives(self, anchor_idx: torch.Tensor, step: int) -> torch.Tensor:
        """CRD 'relax' mode: (B,) -> (B,) another row of the same class for each anchor (the
        anchor itself only when its class has one row), counter-based on anchor_idx's device.
        Deterministic given (seed, step, anchors)."""
        anchors = anchor_idx.detach().reshape(-1).to(torch.int64)  # (B,)
        t = self.tables_on(anchors.device)
        c = t["labels"][anchors]
        start, count = t["class_start"][c], t["class_count"][c]  # (B,)
        others = (count - 1).clamp_min(1)
        p = counter_uniform(counter_keys(self.seed, int(step), 2, anchors), 1, others)[:, 0]  # (B,) in [0, count-1)
        self_pos = t["rank_in_order"][anchors] - start  # anchor's own position in its class run
        p = torch.where(count > 1, p + (p >= self_pos).long(), self_pos)
        return t["order"][start + p]
