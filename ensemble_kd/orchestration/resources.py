"""What a config asks of the Ray cluster, and whether the cluster can ever give it.

Ray never refuses a request it cannot meet: a task or a Tune trial waits for it forever and a Ray
Train worker group gives up after its start timeout (60 s), by then after the teachers have trained.
So a command compares, right after Ray is up, what each of its stages will ask for with the
cluster's totals and nodes, and refuses a request that no amount of waiting can meet, naming the
field. The cluster is taken as it is at that moment: an autoscaling cluster's nodes yet to come do
not count.

What each stage asks (read from the code that asks it, kept in step with it by
tests/test_resources.py):

- ``teachers`` (:func:`ensemble_kd.stages.teachers.run` -> :func:`ensemble_kd.training.loop.fit`):
  per teacher that trains, ``num_workers`` bundles of ``cpus_per_worker`` CPUs (+ 1 GPU with
  ``use_gpu``), all at once: one Ray task in local mode, else a TorchTrainer whose worker group is
  one placement group (its controller holds no CPU). A teacher given as a ``checkpoint`` file never
  trains.
- ``embed`` (:func:`ensemble_kd.stages.embed.embed_ranges`): Ray tasks of ``cpus_per_actor`` CPUs
  and ``gpus_per_actor`` of a GPU each; a teacher's W tasks are independent, so one at a time is
  enough to finish.
- ``distill`` (``ensemble-kd distill``, or ``run`` without arms): the loop as for a teacher, with
  ``distill.num_workers``, ``cpus_per_worker`` and ``use_gpu``.
- ``tune`` (:func:`ensemble_kd.orchestration.sweep.trial_resources`): a single-worker trial in
  local mode holds one worker's bundle in its own process; otherwise the trial's process holds
  ``tune.cpus_per_trial`` CPUs while its TorchTrainer asks for ``num_workers`` worker bundles
  besides.

Only what can never be met is refused (more than the cluster's totals, a bundle no node can hold,
identical bundles the nodes cannot hold all at once); what merely has to wait for other work is
left to Ray. The checks are pure functions of the config and of ``ray.cluster_resources()`` /
``ray.nodes()``-shaped dicts, so they are tested without a cluster.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import ray

from ensemble_kd.core.config import ConfigError, ExperimentConfig

Stages = Collection[str]
"""Some of :data:`STAGES`: the stages a command runs."""

STAGES: frozenset[str] = frozenset({"teachers", "embed", "distill", "tune"})
"""The stages a command may run. ``ensemble-kd run`` is checked for all four: its arms are Tune
trials and, without arms, its one distillation is the distill stage (the tune request is the larger
of the two by a trial's own CPUs)."""

# Ray counts resources in units of 1e-4: a float sum a hair over a whole number is not "more"
_EPS = 1e-6


@dataclass(frozen=True)
class Request:
    """``bundles`` bundles of ``cpus`` CPUs + ``gpus`` GPUs each, that Ray must hold at once (each
    bundle on one node), as one stage asks for them.

    ``field``: the config field whose value sets the count (``distill.num_workers``,
    ``teachers.<name>.num_workers``) or, for the embed stage's lone tasks, their size
    (``embed.cpus_per_actor``); ``what``: the work in words, for the messages. ``driver_cpus``: CPUs
    held at the same time by one more process beside the bundles (a multi-worker Tune trial's own
    process, ``tune.cpus_per_trial``)."""

    field: str
    cpus: float
    gpus: float
    bundles: int = 1
    what: str = ""
    driver_cpus: float = 0.0

    def total(self, resource: str) -> float:
        """How much of ``resource`` this request holds at once, over the whole cluster."""
        if resource == "CPU":
            return self.bundles * self.cpus + self.driver_cpus
        return self.bundles * self.gpus


def requests(cfg: ExperimentConfig, stages: Stages) -> list[Request]:
    """What the ``stages`` of a command (a subset of :data:`STAGES`) ask of Ray, in the order they
    ask it."""
    unknown = set(stages) - STAGES
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; the stages are {sorted(STAGES)}")
    out: list[Request] = []
    if "teachers" in stages:
        out += [Request(f"teachers.{t.name}.num_workers", t.cpus_per_worker, 1.0 if t.use_gpu else 0.0, t.num_workers,
                        f"teacher {t.name}'s training")
                for t in cfg.teachers if not t.checkpoint]
    if "embed" in stages:
        e = cfg.embed
        # named by the GPU share where there is one: on a cluster short of GPUs that is what to change
        out.append(Request("embed.gpus_per_actor" if e.gpus_per_actor > 0 else "embed.cpus_per_actor",
                           e.cpus_per_actor, e.gpus_per_actor, 1, "an embed task"))
    d = cfg.distill
    workers = dict(field="distill.num_workers", cpus=d.cpus_per_worker, gpus=d.gpus_per_worker if d.use_gpu else 0.0,
                   bundles=d.num_workers)
    if "distill" in stages:
        out.append(Request(**workers, what="the distillation"))
    if "tune" in stages:
        # as sweep.trial_resources and loop.runs_locally: only a local-mode trial runs its worker in its own process
        local = d.local_mode and d.num_workers == 1
        out.append(Request(**workers, what="a Tune trial",
                           driver_cpus=0.0 if local else cfg.tune.cpus_per_trial))
    return out


def check_resources(cfg: ExperimentConfig, stages: Stages, totals: Mapping[str, float],
                    nodes: Sequence[Mapping[str, float]]) -> None:
    """Raise :class:`ConfigError` for the first request of ``stages`` that the cluster can never
    meet. ``totals``: ``ray.cluster_resources()``; ``nodes``: each live node's resources (the
    ``Resources`` of ``ray.nodes()``; empty: only the totals are checked)."""
    for r in requests(cfg, stages):
        problem = _never_met(r, totals, nodes)
        if problem:
            raise ConfigError(problem)


def check_cluster(cfg: ExperimentConfig, stages: Stages) -> None:
    """:func:`check_resources` against the Ray this process is connected to (Ray must be up)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    check_resources(cfg, stages, ray.cluster_resources(), nodes)


def _never_met(r: Request, totals: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why ``r`` can never be met on this cluster, or None."""
    for res in ("GPU", "CPU"):  # GPUs first: a GPU job on a CPU cluster is the usual mistake, and says so
        need, have = r.total(res), float(totals.get(res, 0.0))
        if need > have + _EPS:
            return f"{_asked(r, res)} needs {_amount(need, res)}; the cluster has {_num(have)}"
    if not nodes:  # nothing known per node: the totals are all there is to go by
        return None
    bundle = {"CPU": r.cpus, "GPU": r.gpus}
    if not any(_fits(bundle, n) for n in nodes):
        big = _largest(nodes, r.gpus > 0)
        return (f"{_bundle_phrase(r)} needs {_amount(r.cpus, 'CPU')}"
                + (f" and {_amount(r.gpus, 'GPU')}" if r.gpus else "")
                + f" on one node for {r.what}; the largest node has {_node_phrase(big, r.gpus > 0)}")
    if r.driver_cpus and not any(_fits({"CPU": r.driver_cpus}, n) for n in nodes):
        big = _largest(nodes, False)
        return (f"tune.cpus_per_trial={_num(r.driver_cpus)} needs {_amount(r.driver_cpus, 'CPU')} on one node for "
                f"{r.what}'s own process; the largest node has {_node_phrase(big, False)}")
    held = sum(_how_many(bundle, n) for n in nodes)
    if held < r.bundles:  # identical bundles: a node holds as many as its scarcest resource allows, so this is exact
        return (f"{r.field}={r.bundles} needs {r.bundles} workers of {_amount(r.cpus, 'CPU')}"
                + (f" + {_amount(r.gpus, 'GPU')}" if r.gpus else "") + f" each at once for {r.what}; "
                f"the cluster's {len(nodes)} nodes hold {held} such workers")
    return None


def _workers(r: Request) -> bool:
    """Ray Train workers (``num_workers``, ``cpus_per_worker``, ``use_gpu``), not embed tasks."""
    return r.field.endswith(".num_workers")


def _asked(r: Request, resource: str) -> str:
    """The fields that ask for ``resource`` (CPU or GPU), as the config names them: what to change."""
    section = r.field.rsplit(".", 1)[0]
    if not _workers(r):
        key, value = ("cpus_per_actor", r.cpus) if resource == "CPU" else ("gpus_per_actor", r.gpus)
        return f"{section}.{key}={_num(value)}"
    head = f"{r.field}={r.bundles} with " + (f"cpus_per_worker={_num(r.cpus)}" if resource == "CPU" else "use_gpu")
    if resource == "CPU" and r.driver_cpus:
        head += f" and tune.cpus_per_trial={_num(r.driver_cpus)}"
    return head


def _bundle_phrase(r: Request) -> str:
    """The fields that size one bundle: ``distill.cpus_per_worker=4 with use_gpu``."""
    if not _workers(r):
        return _asked(r, "GPU" if r.gpus else "CPU")
    return f"{r.field.rsplit('.', 1)[0]}.cpus_per_worker={_num(r.cpus)}" + (" with use_gpu" if r.gpus else "")


def _fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(v <= float(node.get(k, 0.0)) + _EPS for k, v in bundle.items() if v > 0)


def _how_many(bundle: Mapping[str, float], node: Mapping[str, float]) -> float:
    """How many copies of ``bundle`` the node holds at once (inf for an empty bundle)."""
    return min((math.floor((float(node.get(k, 0.0)) + _EPS) / v) for k, v in bundle.items() if v > 0),
               default=math.inf)


def _largest(nodes: Sequence[Mapping[str, float]], by_gpu: bool) -> Mapping[str, float]:
    def size(n: Mapping[str, float]) -> tuple[float, float]:
        return (float(n.get("GPU", 0.0)) if by_gpu else 0.0, float(n.get("CPU", 0.0)))
    return max(nodes, key=size, default={})


def _node_phrase(node: Mapping[str, float], gpu: bool) -> str:
    cpu = _amount(float(node.get("CPU", 0.0)), "CPU")
    return f"{cpu} and {_amount(float(node.get('GPU', 0.0)), 'GPU')}" if gpu else cpu


def _num(x: float) -> str:
    return f"{x:g}"


def _amount(x: float, resource: str) -> str:
    """``4 GPUs``, ``1 GPU``, ``0.25 GPU``."""
    return f"{_num(x)} {resource}" + ("" if 0 < x <= 1 else "s")
