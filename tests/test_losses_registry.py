"""Every registered loss, through the registry: is a class of the contract's shape, builds from
its defaults, gives a finite scalar and the metrics pinned in METRIC_KEYS (detached 0-d tensors),
sends finite non-zero gradients to every trainable part (its own and the student's), works
with 1 and 3 teachers (and 0 where it needs none), keeps its buffers identical across 2 real
gloo processes, has a docs page naming all its options, imports nothing of the orchestration;
and one real Ray Train distillation with the embedding/logit-level losses. New losses are
covered by being registered."""
from __future__ import annotations

import ast
import inspect
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from ensemble_kd.losses import LOSSES, DistillInputs, LossContext, LossOutput, TeacherBank, build_loss
from ensemble_kd.losses.base import LossRegistry
from tests.helpers import distill_cfg, embed, out_with_teachers, run_distill, spawn_processes

ROOT = Path(__file__).resolve().parents[1]
M, C, D_IN, D_S, B = 48, 5, 7, 8, 12
MAP = (3, 4, 4)  # the student's intermediate map (C, H, W) for feature-map losses
TEACHER_DIMS = {"t0": 6, "t.1": 10, "t2": 3}  # different dims; a '.' in a name (module keys)

# Options for a fast test (the defaults otherwise, e.g. CRD's 16384 negatives, are slow here).
TEST_KWARGS: dict[str, dict] = {
    "crd": {"num_negatives": 64, "feat_dim": 16, "hard_pool": 8},
    "gacd": {"num_negatives": 64, "feat_dim": 16, "hard_pool": 8},
    "dfnd": {"class_accuracy": [0.8, 0.7, 0.9, 0.6, 0.75]},  # C values; else it reads a selection file
    "hint": {"stage": 1},  # TinyStudent's one intermediate map (the default 2 is its embedding)
    "ft": {"init_epochs": 0},  # the factor stage (its paraphraser stage: tests/test_featuremap_losses.py)
}

# Parameters that get no gradient by design, with the reason. Checked both ways: a listed
# parameter must really get none (so the list cannot go stale).
EMB_ONLY = "an embedding-level loss reads student_emb only: the student's classifier head takes no part"
MAPS_ONLY = "a feature-map loss reads the intermediate maps only: the embedding and the classifier head take no part"
NO_GRAD_BY_DESIGN: dict[str, dict[str, str]] = {
    **{name: {"student.head.": EMB_ONLY} for name in ("crd", "gacd", "vid", "fitnet", "pkt", "rkd", "sp", "cc")},
    **{name: {"student.head.": MAPS_ONLY, "student.body.": MAPS_ONLY}
       for name in ("at", "fsp", "nst", "sp_map", "hint", "vid_map", "ft", "ab")},
}


# The metric keys each loss emits for teachers ``ts`` (the names the loop logs and dashboards
# read); a loss not listed emits none. A new or renamed metric must be pinned here.
def _crd_keys(ts: list[str]) -> set[str]:
    return {f"crd/{t}/{k}" for t in ts for k in ("loss_a", "loss_b", "z_a", "z_b")}


METRIC_KEYS: dict[str, Callable[[list[str]], set[str]]] = {
    "crd": _crd_keys,
    "gacd": lambda ts: _crd_keys(ts) | {f"gacd/{t}/mean_weight" for t in ts},
    "vid": lambda ts: {f"vid/{t}/{k}" for t in ts for k in ("loss", "sigma_emb")},  # default target: embedding
    "dfnd": lambda ts: {"dfnd/q_diag_mean"},
    "vid_map": lambda ts: {f"vid_map/{t}/var" for t in ts},
}


class TinyStudent(nn.Module):
    """x (B, D_IN) -> (emb (B, D_S), logits (B, C)): the (embedding, logits) pair every encoder gives;
    with ``maps``, also ``forward_features``: [a stem map, one intermediate map, emb], as the encoders'."""

    def __init__(self, maps: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(D_IN, D_S)
        self.head = nn.Linear(D_S, C)
        self.maps = nn.Linear(D_IN, MAP[0] * MAP[1] * MAP[2]) if maps else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.tanh(self.body(x))  # (B, D_S)
        return emb, self.head(emb)  # (B, C)

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        emb, logits = self(x)
        mid = torch.tanh(self.maps(x)).view(x.shape[0], *MAP)  # (B, 3, 4, 4)
        return [x[:, :4].reshape(x.shape[0], 1, 2, 2), mid, emb], logits  # a square stem map (1, 2, 2), as FSP needs


def needs_maps(name: str) -> bool:
    return "feature_maps" in LOSSES.meta(name).get("needs", ())


def make_ctx(num_teachers: int, seed: int = 0) -> LossContext:
    g = torch.Generator().manual_seed(seed)
    dims = dict(list(TEACHER_DIMS.items())[:num_teachers])
    labels = torch.randint(0, C, (M,), generator=g)
    labels[:C] = torch.arange(C)  # every class present
    bank = TeacherBank(embeddings={n: torch.randn(M, d, generator=g) for n, d in dims.items()},
                       logits={n: 3 * torch.randn(M, C, generator=g) for n in dims},
                       labels=labels, sample_ids=torch.arange(M))
    return LossContext(student_dim=D_S, num_classes=C, teacher_dims=dims, bank=bank, seed=seed,
                       student_feat_shapes=((1, 2, 2), MAP, (D_S,)),  # TinyStudent.forward_features
                       teacher_feat_shapes={n: ((1, 8, 8), (MAP[0], 8, 8), (d,)) for n, d in dims.items()})  # make_batch


def inputs_of(bank: TeacherBank) -> torch.Tensor:
    """A fixed input per bank row (what the student sees for that sample)."""
    return torch.randn(bank.num_rows, D_IN, generator=torch.Generator().manual_seed(7))


def make_batch(ctx: LossContext, rows: torch.Tensor) -> dict:
    """The batch dict the training loop's DistillModule takes."""
    bank = ctx.bank
    g = torch.Generator().manual_seed(11)
    # (B, C_t, 8, 8): the student's channels (FSP needs them equal), another size (pooled to 4)
    maps = {n: torch.randn(bank.num_rows, MAP[0], 8, 8, generator=g)[rows] for n in bank.embeddings}
    return {"x": inputs_of(bank)[rows], "labels": bank.labels[rows], "index": rows,
            "teacher_emb": {n: e[rows] for n, e in bank.embeddings.items()},
            "teacher_logits": {n: t[rows] for n, t in bank.logits.items()},
            "teacher_feats": {n: [maps[n][:, :1], maps[n], e[rows]] for n, e in bank.embeddings.items()}}


def default_kwargs(name: str) -> dict:
    """Every option of the loss at its signature default, overlaid with TEST_KWARGS (passing
    the defaults explicitly checks that they are valid values, not just absent options)."""
    params = list(inspect.signature(LOSSES.get(name)).parameters.values())[1:]  # [0] is ctx
    kw = {p.name: p.default for p in params}
    kw.update(TEST_KWARGS.get(name, {}))
    return kw


def teacher_counts(name: str) -> list[int]:
    return [1, 3] if LOSSES.meta(name).get("needs_teachers", True) else [0, 1, 3]


CASES = [(n, k) for n in LOSSES.names() for k in teacher_counts(n)]


@pytest.mark.parametrize("name,num_teachers", CASES, ids=[f"{n}-{k}t" for n, k in CASES])
def test_forward_backward_every_parameter_gets_a_gradient(name, num_teachers):
    torch.manual_seed(0)
    ctx = make_ctx(num_teachers)
    loss_mod = build_loss(name, ctx, **default_kwargs(name))
    assert isinstance(loss_mod, nn.Module)
    student = TinyStudent(maps=needs_maps(name))
    batch = make_batch(ctx, torch.arange(3, 3 + B))
    feats, logits = student.forward_features(batch["x"]) if needs_maps(name) else (None, student(batch["x"])[1])
    emb = feats[-1] if feats is not None else student(batch["x"])[0]
    x = DistillInputs(emb, logits, batch["labels"], batch["index"], batch["teacher_emb"], batch["teacher_logits"],
                      epoch=2, step=17, student_feats=feats, teacher_feats=batch["teacher_feats"] if feats else {})
    out = loss_mod(x)
    assert isinstance(out, LossOutput), (name, type(out))
    loss = out.loss
    assert isinstance(loss, torch.Tensor) and loss.shape == () and torch.isfinite(loss), (name, loss)
    assert set(out.metrics) == METRIC_KEYS.get(name, lambda ts: set())(list(ctx.teacher_dims)), (name, sorted(out.metrics))
    for k, v in out.metrics.items():  # tensors, so a step never waits for the device
        assert isinstance(v, torch.Tensor) and v.shape == () and not v.requires_grad, (name, k, v)
        assert v.device == loss.device and torch.isfinite(v), (name, k, v)
    loss.backward()
    allowed = NO_GRAD_BY_DESIGN.get(name, {})
    named = [(f"student.{n}", p) for n, p in student.named_parameters()]
    named += [(f"loss.{n}", p) for n, p in loss_mod.named_parameters() if p.requires_grad]
    for pname, p in named:
        reason = next((r for prefix, r in allowed.items() if pname.startswith(prefix)), None)
        if reason is not None:
            assert p.grad is None or not p.grad.any(), f"{name}: {pname} is allow-listed ({reason}) but got a gradient"
            continue
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", [n for n in LOSSES.names() if LOSSES.meta(n).get("needs_teachers", True)])
def test_needs_teachers_refuses_zero_teachers(name):
    with pytest.raises(ValueError, match="needs at least one teacher"):
        build_loss(name, make_ctx(0), **TEST_KWARGS.get(name, {}))


@pytest.mark.parametrize("name", LOSSES.names())
def test_registered_with_paper_and_rejects_unknown_option(name):
    meta = LOSSES.meta(name)
    assert isinstance(meta.get("needs_teachers"), bool) and meta.get("paper"), meta
    with pytest.raises(ValueError, match=f"loss '{name}': bad options"):
        build_loss(name, make_ctx(1), not_an_option_of_any_loss=1)


@pytest.mark.parametrize("name", LOSSES.names())
def test_registered_entry_is_a_module_class_with_ctx_then_keyword_options(name):
    """The shape config validation relies on: inspect.signature(cls) = (ctx, *, option=default, ...)."""
    cls = LOSSES.get(name)
    assert isinstance(cls, type) and issubclass(cls, nn.Module), cls
    params = list(inspect.signature(cls).parameters.values())
    assert params[0].name == "ctx" and params[0].kind is params[0].POSITIONAL_OR_KEYWORD
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params[1:]), params
    assert isinstance(build_loss(name, make_ctx(1), **TEST_KWARGS.get(name, {})), cls)


def test_registry_refuses_what_breaks_the_contract():
    reg = LossRegistry("loss")
    meta = {"needs_teachers": True, "paper": "x"}

    class Positional(nn.Module):
        def __init__(self, ctx, temperature=1.0): super().__init__()

    class Kwargs(nn.Module):
        def __init__(self, ctx, **kw): super().__init__()

    class NoDefault(nn.Module):
        def __init__(self, ctx, *, temperature): super().__init__()

    class NoCtx(nn.Module):
        def __init__(self, *, temperature=1.0): super().__init__()

    class Good(nn.Module):
        def __init__(self, ctx, *, temperature=1.0): super().__init__()

    def builder(ctx, *, temperature=1.0): return Good(ctx)

    for bad, match in ((Positional, "keyword-only"), (Kwargs, "keyword-only"), (NoDefault, "keyword-only"),
                       (NoCtx, "first parameter"), (builder, "nn.Module subclass")):
        with pytest.raises(TypeError, match=match):
            reg.register("bad", **meta)(bad)
    with pytest.raises(TypeError, match="needs_teachers"):
        reg.register("bad", paper="x")(Good)
    assert reg.register("good", **meta)(Good) is Good and reg.names() == ["good"]


def test_interface_fields():
    """The loop builds DistillInputs positionally up to teacher_logits; epoch, step, the feature
    maps (online path), the optional contrast_idx (CRD) and labelled mask (labels on a subset) come last."""
    assert [f.name for f in fields(DistillInputs)] == ["student_emb", "student_logits", "labels", "index",
                                                       "teacher_emb", "teacher_logits", "epoch", "step",
                                                       "student_feats", "teacher_feats", "contrast_idx", "labelled"]
    x = DistillInputs(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1), torch.zeros(1))
    assert (x.epoch, x.step, x.teacher_emb, x.teacher_logits, x.contrast_idx, x.labelled) == (0, 0, {}, {}, None, None)
    assert (x.student_feats, x.teacher_feats) == (None, {})
    assert [f.name for f in fields(LossOutput)] == ["loss", "metrics"]
    assert [f.name for f in fields(LossContext)][-1] == "selection" and make_ctx(1).selection is None
    with pytest.raises(ValueError, match="0-d"):
        LossOutput(torch.zeros(2))
    with pytest.raises(ValueError, match="detached 0-d tensors; not so: \\['m'\\]"):
        LossOutput(torch.zeros(()), {"m": torch.zeros((), requires_grad=True)})
    with pytest.raises(ValueError, match="detached 0-d tensors"):
        LossOutput(torch.zeros(()), {"m": 1.0})


# The only parts of ensemble_kd a loss may import: the losses, their building blocks and the
# file format of a selection (DFND), never the orchestration (loop, stages, config, Ray).
ALLOWED_IMPORTS = ("ensemble_kd.losses", "ensemble_kd.blocks.memory", "ensemble_kd.core.dist", "ensemble_kd.registry",
                   "modalities.registry", "ensemble_kd.blocks.selection", "ensemble_kd.core.devices", "ensemble_kd.blocks.bank",
                   "ensemble_kd.core.errors", "ensemble_kd.core.rows")


@pytest.mark.parametrize("path", sorted((ROOT / "ensemble_kd" / "losses").glob("*.py")), ids=lambda p: p.name)
def test_losses_import_only_their_building_blocks_at_module_top(path):
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        assert id(node) in top, f"{path.name}:{node.lineno}: import inside a function or block"
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:  # `from ensemble_kd.core import dist` names ensemble_kd.core.dist
            names = [f"{node.module}.{a.name}" if (node.module or "").split(".")[0] in ("ensemble_kd", "modalities")
                     else node.module
                     for a in node.names]
        for n in names:
            if n.split(".")[0] in ("ensemble_kd", "modalities"):
                assert n.startswith(ALLOWED_IMPORTS), f"{path.name}:{node.lineno}: imports {n}"


# -- docs stay true to the code ------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_has_a_docs_page_naming_its_options(name):
    page = ROOT / "docs" / "methods" / f"{name}.md"
    assert page.exists(), f"no docs page {page.relative_to(ROOT)} for loss {name!r}"
    text = page.read_text()
    options = [p for p in list(inspect.signature(LOSSES.get(name)).parameters)[1:]]
    undocumented = [o for o in options if f"`{o}`" not in text]
    assert not undocumented, f"{page.relative_to(ROOT)} does not mention options {undocumented}"
    assert f"name: {name}" in text, f"{page.relative_to(ROOT)} has no `distill.losses` YAML snippet"
    index = (ROOT / "docs" / "methods" / "README.md").read_text()
    assert f"({name}.md)" in index, f"docs/methods/README.md does not link {name}.md"


# -- 2 real processes (gloo): identical buffers and parameters across ranks ---------------------
WS, STEPS, GLOBAL_B = 2, 2, 16


def _rank_run(name: str, rank: int) -> dict:
    """Build loss `name` (+ ce, as a training recipe would) into the loop's DistillModule, wrap it
    with DDP as Ray Train does, run STEPS steps on this rank's half of each global batch, and
    compare every buffer and parameter with the other rank's (all-gathered)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ensemble_kd.core import dist
    from ensemble_kd.training.loop import DistillModule

    torch.manual_seed(0)  # same initial weights on every rank, as seed_everything in the loop
    ctx = make_ctx(3 if LOSSES.meta(name).get("needs_teachers", True) else 0)
    losses = {name: build_loss(name, ctx, **default_kwargs(name))}
    if name != "ce":
        losses["ce"] = build_loss("ce", ctx)
    module = DistillModule(TinyStudent(maps=needs_maps(name)), losses, {n: 1.0 for n in losses}, needs_maps(name))

    def gathered_equal() -> dict[str, bool]:
        out = {}
        for kind, items in (("buffer", module.named_buffers()), ("param", module.named_parameters())):
            for bname, b in sorted(items):
                both = dist.all_gather_cat(b.detach().reshape(1, -1))  # (WS, n) in rank order
                out[f"{kind}:{bname}"] = bool(all(torch.equal(both[0], both[r]) for r in range(WS)))
        return out

    at_init = gathered_equal()  # before DDP's own broadcast from rank 0
    with warnings.catch_warnings():  # torch's rename notice; the loop passes the same option to Ray
        warnings.simplefilter("ignore", FutureWarning)
        model = DDP(module, broadcast_buffers=False)  # the loop's wrap (prepare_model)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(3))
    step_losses = []
    for step in range(STEPS):
        rows = perm[step * GLOBAL_B: (step + 1) * GLOBAL_B].view(WS, -1)[rank]  # this rank's half
        parts = model(make_batch(ctx, rows))  # name -> LossOutput
        loss = sum(module.weights[n] * v.loss for n, v in parts.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_losses.append({n: float(v.loss.detach()) for n, v in parts.items()})
    return {"losses": step_losses, "at_init": at_init, "after": gathered_equal(),
            "buffers": sorted(n for n, _ in module.named_buffers())}


def _ws2_worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WS)
    try:
        results = {name: _rank_run(name, rank) for name in names}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        tdist.destroy_process_group()


def test_two_processes_keep_buffers_and_parameters_identical(tmp_path):
    names = LOSSES.names()
    spawn_processes(_ws2_worker, (str(tmp_path / "pg_init"), str(tmp_path), names), WS, timeout_s=180)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WS)]
    for name in names:
        for r in range(WS):
            res = per_rank[r][name]
            assert len(res["losses"]) == STEPS
            for step in res["losses"]:
                assert set(step) >= {name} and all(math.isfinite(v) for v in step.values()), (name, r, step)
            bad_init = [k for k, ok in res["at_init"].items() if not ok]
            bad_after = [k for k, ok in res["after"].items() if not ok]
            assert not bad_init, f"{name}: differs across ranks at build time: {bad_init}"
            assert not bad_after, f"{name}: differs across ranks after {STEPS} steps: {bad_after}"
        # the ranks saw different rows, so their losses differ: the comparison above is not vacuous
        assert per_rank[0][name]["losses"][0][name] != per_rank[1][name]["losses"][0][name], name
    # the memory-keeping losses really have buffers under test
    for name in ("crd", "gacd"):
        if name in names:
            assert any("memory" in b for b in per_rank[0][name]["buffers"]), per_rank[0][name]["buffers"]


# -- one real distillation (Ray Train) with the embedding/logit-level losses -------------------
E2E_LOSSES = ["ce", "vid", "rkd", "sp", "pkt", "cc", "fitnet", "dkd"]


@pytest.fixture(scope="module")
def e2e_shards(ray_cluster, trained, shard_cache, tmp_path_factory):
    """Like tests/test_distill.py's `shards`: an output dir with the session's teachers and their
    train shards (module-scoped there, so built again here)."""
    out = out_with_teachers(trained, tmp_path_factory, "distill-registry", shards_from=shard_cache)
    embed(distill_cfg(out))
    return str(out)


def test_distill_end_to_end_with_the_new_losses(e2e_shards):
    cfg = distill_cfg(e2e_shards, **{"distill.epochs": 1, "distill.losses": [{"name": n} for n in E2E_LOSSES]})
    res = run_distill(cfg)
    assert len(res.history) == 1
    last = res.history[-1]
    for n in E2E_LOSSES + ["total"]:
        assert f"loss/{n}" in last and math.isfinite(last[f"loss/{n}"]), (n, last)
    assert res.final_top1 is not None and math.isfinite(res.final_top1)
