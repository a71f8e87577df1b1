"""A Ray cluster of several nodes on this one machine, for the tests and bench/cluster_sweep.py.

Each node is a real ``ray start --block`` process in its own process group, with its own ports and
its own ``--temp-dir`` (so each node keeps its own logs, as separate machines would), started one
after another and stopped by its process group. A node can be started in its own mount namespace
with a folder hidden under an empty tmpfs: the node that does not see the shared output folder.
Jobs go in with ``ray job submit --working-dir``, as a user submits them.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
# Every port a node opens that has a fixed default: two nodes on one machine must not share any
# (and the suite's own local Rays may hold the defaults).
NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                   "runtime-env-agent-port", "metrics-export-port")


# Ports for the nodes come from below Linux's ephemeral range (32768-60999), where every other
# process of the suite (other tests' local Rays, their workers' gRPC servers) gets its port-0 binds,
# and above Ray's worker ports (10002-19999): a port picked from the ephemeral range can be taken by
# another process between the pick and the node's own bind (a head whose job agent then never comes up).
PORT_RANGE = (20000, 32000)


def free_ports(n: int) -> list[int]:
    """n distinct free ports from PORT_RANGE, all bound at once to check them."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            port = rng.randrange(*PORT_RANGE)
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            if port not in ports:
                ports.append(port)
        return ports


def cluster_env() -> dict[str, str]:
    """The environment of the nodes and of `ray job submit`: this one, without a Ray address and
    without this test process's tracking URI (a job resolves its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTEST_XDIST_WORKER")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    return env


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    num_cpus: float
    hidden: Path | None = None

    def log_text(self, pattern: str = "worker-*.out") -> str:
        """Everything this node's worker processes printed (its own temp dir: its own machine's logs)."""
        logs = sorted(self.temp_dir.glob(f"session_*/logs/{pattern}"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # `ray start --block` stops its node on SIGTERM

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM, then SIGKILL to the whole group: a head waits for its dashboard for half a
        minute on SIGTERM, and nothing of a test's cluster needs an orderly end."""
        self.signal()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.signal(signal.SIGKILL)  # whatever the node left behind in its group


@dataclass
class LocalCluster:
    """A head (``head_cpus``, 0 by default: all work on the worker nodes) with the job server, and
    worker nodes added by :meth:`add_worker`. Use as a context manager: every node stops at exit."""

    head_cpus: float = 0
    env: dict[str, str] = field(default_factory=cluster_env)
    nodes: list[Node] = field(default_factory=list)
    port: int = 0
    dashboard: int = 0

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def __enter__(self) -> LocalCluster:
        for attempt in range(3):  # a head whose job agent did not come up is started again, on fresh ports
            try:
                self.start_head()
                problem = self.wait_for_job_agent()
            except BaseException:
                self.stop()
                raise
            if problem is None:
                return self
            self.stop()
        raise RuntimeError(f"the head's job agent did not come up in 3 starts; the last one: {problem}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, name: str, args: list[str], num_cpus: float, hide: Path | None = None) -> Node:
        tmp = Path(tempfile.mkdtemp(prefix=f"ekd-{name}-", dir="/tmp"))  # short: Ray's socket paths are length-limited
        ports = [f"--{f}={p}" for f, p in zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS)))]
        cmd = [*RAY, "start", "--block", f"--num-cpus={num_cpus:g}", f"--temp-dir={tmp}", "--disable-usage-stats",
               *ports, *args]
        if hide is not None:  # its own mount namespace: an empty tmpfs where the others see the shared folder
            hide.mkdir(parents=True, exist_ok=True)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs ekd-hidden "$0" && exec "$@"', str(hide), *cmd]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        node = Node(name, proc, tmp, num_cpus, hide)
        self.nodes.append(node)
        return node

    def start_head(self) -> Node:
        self.port, self.dashboard, client = free_ports(3)
        return self._start("head", ["--head", f"--port={self.port}", f"--ray-client-server-port={client}",
                                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                    f"--dashboard-port={self.dashboard}"], self.head_cpus)

    def add_worker(self, num_cpus: float = 1, hide: Path | None = None, wait: bool = True) -> Node:
        """A worker node joined to the head; with ``hide``, one that sees an empty folder there."""
        node = self._start(f"w{len(self.nodes)}", [f"--address={self.gcs}"], num_cpus, hide)
        if wait:
            self.wait_for_nodes(sum(n.proc.poll() is None for n in self.nodes))
        return node

    def alive_nodes(self) -> list[dict]:
        """``ray.nodes()`` of the cluster, alive ones only, read by a short-lived driver."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes() "
                "if n['Alive']]))" % self.gcs)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []

    def wait_for_job_agent(self, timeout: float = 150) -> str | None:
        """Until the head's job agent has registered (``ray job submit`` answers "No available agent"
        before that); None when it has, else why not (the agent's log), so the caller can start again."""
        code = ("import ray, time; from ray.experimental.internal_kv import _internal_kv_get as get\n"
                "ray.init(address=%r, logging_level='ERROR', log_to_driver=False); t = time.time() + %f\n"
                "while time.time() < t:\n"
                "    head = get(b'head_node_id', namespace=b'job')\n"
                "    if head and get('DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX:' + head.decode(), namespace=b'dashboard'):\n"
                "        raise SystemExit(0)\n"
                "    time.sleep(0.5)\n"
                "raise SystemExit(3)" % (self.gcs, timeout))
        deadline = time.time() + timeout + 60
        head = self.nodes[0]
        while time.time() < deadline and head.proc.poll() is None:
            r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                               timeout=timeout + 60)
            if r.returncode == 0:
                return None
            if r.returncode == 3:
                break
            time.sleep(1)  # the GCS does not answer yet
        why = "the head exited" if head.proc.poll() is not None else "no job agent registered"
        return f"{why}; dashboard_agent.log: {head.log_text('dashboard_agent.log')[-2000:]}"

    def wait_for_nodes(self, n: int, timeout: float = 180) -> None:
        """Until ``n`` nodes are alive (each node registers a few seconds after its process starts)."""
        code = ("import ray, sys, time; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "t = time.time() + %f\n"
                "while sum(x['Alive'] for x in ray.nodes()) < %d:\n"
                "    assert time.time() < t, ray.nodes()\n    time.sleep(0.5)" % (self.gcs, timeout, n))
        deadline = time.time() + timeout
        while True:  # the head's GCS takes a moment to answer at all
            for node in self.nodes:
                assert node.proc.poll() is None, f"ray node {node.name} exited with {node.proc.returncode}"
            r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                               timeout=timeout + 60)
            if r.returncode == 0:
                return
            assert time.time() < deadline, f"{n} nodes did not come up: {r.stderr[-3000:]}"
            time.sleep(1)

    def submit(self, *entrypoint: str, submission_id: str, working_dir: Path = REPO, timeout: float = 600
               ) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir`` and wait for the job (its log streamed back, as a user
        sees it); retried while the job agent is still coming up."""
        cmd = [*RAY, "job", "submit", "--address", self.address, "--submission-id", submission_id,
               "--working-dir", str(working_dir), "--log-style", "record", "--", *entrypoint]
        deadline = time.time() + 180
        while True:
            r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=working_dir)
            if "submitted successfully" in r.stdout + r.stderr:
                return r
            if time.time() > deadline:
                r.stderr += f"\n[the head's dashboard_agent.log]\n{self.nodes[0].log_text('dashboard_agent.log')[-3000:]}"
                return r
            time.sleep(2)

    def job_status(self, submission_id: str) -> str:
        r = subprocess.run([*RAY, "job", "status", "--address", self.address, "--log-color", "false", submission_id],
                           env=self.env, capture_output=True, text=True, timeout=120)
        return (r.stdout + r.stderr).lower()

    def stop(self) -> None:
        """Worker nodes first, then the head; every node's temp dir removed."""
        for node in reversed(self.nodes):
            node.signal()  # all at once: each node takes seconds to wind down
        deadline = time.time() + 5
        for node in reversed(self.nodes):
            node.stop(timeout=max(0.1, deadline - time.time()))
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.nodes.clear()
