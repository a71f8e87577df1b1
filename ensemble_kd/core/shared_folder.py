"""The output folder as every node of a Ray cluster sees it: proved shared before any work, and
named, with the node, whenever a process cannot find a file another process wrote there.

Every durable artifact lives in the output folder, and its readers may run on any node (a
teacher's state file written by a rank on one node is read by the driver on another; a data
store prepared by the driver is opened by workers everywhere). So the folder must be one folder,
mounted at the same path on every node. :func:`check_every_node` proves it the way Ray Train's
own storage check does: the driver writes a marker, one task pinned to each alive node (hard
node affinity) reads it back and writes its own, and the driver reads those back.
"""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

from ensemble_kd.core.errors import ProjectError

CHECK_DIR = ".ekd-node-check"  # under the output folder; removed after each check
PROBE_TIMEOUT_S = 120.0  # a node whose probe cannot start (no worker, a runtime env that fails) in this long is named


class FolderNotSharedError(RuntimeError, ProjectError):
    """A node does not see the output folder the driver writes (a missing shared mount)."""


def here() -> str:
    """This process's node as an error names it: ``node <id> (<ip>)`` inside Ray, else the host."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            ip = ray.util.get_node_ip_address()
            return f"node {ctx.get_node_id()[:12]} ({ip})"
    except Exception:  # noqa: BLE001 - naming the node must never hide the error being raised
        pass
    return f"host {socket.gethostname()}"


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a task, an actor, a Tune trial, a Ray Train rank), not
    the driver: such a process reads the output folder and never builds what the driver writes."""
    import sys

    ray = sys.modules.get("ray")  # not imported yet: no Ray process at all
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - a Ray without a runtime context here: not one of its workers
        return False


def not_shared(path: str | Path, output_dir: str | Path, what: str = "a file") -> FolderNotSharedError:
    """The error of a process that cannot find ``path`` that another process (the driver, a rank on
    another node) wrote in the output folder: it names this node and the folder, and says what
    fixes it (never to delete anything: the file exists where it was written)."""
    return FolderNotSharedError(
        f"{here()} does not see {what} {path} in the output folder {output_dir}, which another process wrote "
        f"(usually on another node); mount the same folder at that path on every node")


def _probe(root: str, token: str) -> dict[str, str | bool]:
    """Run on one node: read the driver's marker, then write this node's own beside it."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    ip = ray.util.get_node_ip_address()
    d = Path(root, CHECK_DIR, token)
    try:
        seen = (d / "driver").read_text() == token
    except OSError:
        seen = False
    if seen:
        tmp = d / f".{node}.{os.getpid()}.tmp"
        tmp.write_text(node)
        os.replace(tmp, d / node)
    return {"node": node, "ip": ip, "seen": seen}


def check_every_node(output_dir: str | Path, timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Prove that every alive node of the cluster Ray is connected to sees ``output_dir`` as the
    driver does (both ways: a node reads the driver's marker, the driver reads the node's); returns
    the number of nodes checked. Raises :class:`FolderNotSharedError` naming the first node that
    does not, before any work. Probes hold no CPU, so a CPU-less head is checked too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = Path(output_dir)
    token = uuid.uuid4().hex
    d = out / CHECK_DIR / token
    d.mkdir(parents=True, exist_ok=True)
    (d / "driver").write_text(token)
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(out), token): n for n in nodes}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            n = refs[pending[0]]
            raise FolderNotSharedError(
                f"node {n['NodeID'][:12]} ({n.get('NodeManagerAddress')}) did not answer the output folder check "
                f"within {timeout_s:.0f}s (its workers cannot start?); every node must see the output folder {out}")
        for ref in done:
            r = ray.get(ref)
            if not r["seen"] or not (d / str(r["node"])).is_file():
                raise FolderNotSharedError(
                    f"node {str(r['node'])[:12]} ({r['ip']}) does not see the output folder {out} that the driver "
                    f"wrote; mount the same folder at that path on every node")
        return len(nodes)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        try:
            (out / CHECK_DIR).rmdir()  # only when no other command's check is under way
        except OSError:
            pass


def in_job_working_copy(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` lies in the temporary copy of the working dir that a Ray job runs in
    (``ray job submit --working-dir``): a relative ``--out`` lands there, on the head node only,
    and Ray deletes it with the job's runtime env."""
    import ray

    working_dir = (ray.get_runtime_context().runtime_env or {}).get("working_dir")
    return bool(working_dir) and Path(output_dir).resolve().is_relative_to(Path.cwd().resolve())


def check_cluster(output_dir: str | Path) -> int:
    """What a command on a cluster it joined proves before any work: that the output folder is not
    the job's temporary working copy, and that every node sees it (:func:`check_every_node`).
    Returns the number of nodes checked; 0 when the cluster is this process's own node alone
    (nothing to prove)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id():
        return 0
    if in_job_working_copy(output_dir):
        raise FolderNotSharedError(
            f"output_dir {output_dir} is inside this Ray job's temporary copy of its working dir ({Path.cwd()}), "
            f"which only this node sees and Ray deletes after the job; on a cluster of {len(nodes)} nodes give an "
            f"absolute --out on a folder every node mounts (e.g. --out /shared/ekd)")
    return check_every_node(output_dir)
