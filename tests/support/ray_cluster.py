"""A real multi-node Ray cluster for tests: ``ray start --head`` plus worker nodes, on loopback.

:func:`ray_cluster` starts a head node and one worker node per entry of ``workers`` (each
``ray start --address`` with its own CPUs and custom resources), all on 127.0.0.1 with their
files in one short temporary folder, and stops exactly those processes on exit.

Every ``ray start`` runs with ``--block``: it stays our child, and on SIGTERM it stops the Ray
processes it started (raylet, GCS, agents, workers). ``ray stop`` is never used: it kills every
Ray process of the user on the machine, other sessions' clusters included. Whatever outlived
its ``ray start`` (found by the cluster's unique temporary folder in its command line) is
killed by PID as a last resort.

Ray needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (else it binds a non-loopback address) and
``RAY_AUTH_MODE=disabled`` (else clients fail with ``InvalidAuthToken``) on these machines;
:data:`RAY_ENV` holds both (set them for the driver too). The head node gets both and binds
127.0.0.1 only. A worker node refuses to join with the first variable at 0 ("multi-node clusters
are not supported"), so worker nodes run with it at 1, which has two effects in Ray 2.60: they
rewrite ``127.0.0.1`` in ``--address`` and ``--node-ip-address`` to the machine's outward
address (so ``--address`` names the head by another name of 127.0.0.1, see
:func:`services.stack.loopback_name`), and they register and listen on that address (their raylet and agents
also listen on all interfaces). The head's GCS stays on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.stack import kill_processes_naming, loopback_name
from tests.support.processes import free_port, log_tail, start_process, stop_process, wait_until

__all__ = [
    "RAY_ENV",
    "RayClusterInfo",
    "WorkerNode",
    "kill_processes_under",
    "ray_client_env",
    "ray_cluster",
]

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
"""What Ray needs in the environment of every node and client on these machines."""

_OBJECT_STORE_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class WorkerNode:
    """A worker node to start: its CPUs and custom resources (``{"genq_node_a": 1}``)."""

    num_cpus: int = 1
    resources: Mapping[str, float] | None = None


@dataclass(frozen=True)
class RayClusterInfo:
    """A running test cluster.

    Attributes:
        address: ``127.0.0.1:PORT`` of the head's GCS, for ``ray.init(address=...)``.
        temp_dir: the cluster's temporary folder (sessions and logs).
        pids: the ``ray start --block`` processes, head first.
    """

    address: str
    temp_dir: Path
    pids: tuple[int, ...]


@contextmanager
def ray_cluster(
    workers: Sequence[WorkerNode],
    *,
    head_cpus: int = 0,
    start_timeout: float = 120.0,
) -> Iterator[RayClusterInfo]:
    """Run a head node and ``workers`` on this machine.

    Args:
        workers: the worker nodes to start, each joining the head with ``ray start --address``.
        head_cpus: CPUs of the head node (0: no task or actor lands on it).
        start_timeout: seconds to wait for each node to join.

    Yields:
        the head's address and the cluster's folder.

    Raises:
        RuntimeError: a node did not start or join in time; the message ends with its log.
    """
    # short: Ray's unix sockets live below it and their paths are limited to ~107 characters
    root = Path(tempfile.mkdtemp(prefix="genqray-", dir="/tmp"))
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # 1. the head node
        port = free_port()
        address = f"127.0.0.1:{port}"
        head = [
            "--head",
            f"--port={port}",
            f"--num-cpus={head_cpus}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        ]
        processes.append(_start_node(head, root, env, "head"))
        _wait_for_nodes(address, 1, processes, root, env, start_timeout)
        # 2. the worker nodes, one at a time (several joining at once time out on 2 cores)
        for index, node in enumerate(workers):
            args = [f"--address={loopback_name()}:{port}", f"--num-cpus={node.num_cpus}"]
            if node.resources:
                args.append(f"--resources={json.dumps(dict(node.resources))}")
            # a worker node refuses to join with the variable at 0 (it reads it as "no
            # multi-node clusters"); see the module docstring
            joining = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
            processes.append(_start_node(args, root, joining, f"worker-{index}"))
            _wait_for_nodes(address, 2 + index, processes, root, env, start_timeout)
        yield RayClusterInfo(
            address=address, temp_dir=root, pids=tuple(process.pid for process in processes)
        )
    finally:
        # 3. worker nodes first, the head last; then anything that outlived them
        for process in reversed(processes):
            stop_process(process, timeout_s=30.0)  # ray start --block stops what it started
        kill_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


def kill_processes_under(root: Path) -> None:
    """Kill, by PID, processes whose command line names this cluster's folder (ours only)."""
    kill_processes_naming(str(root))


@contextmanager
def ray_client_env() -> Iterator[None]:
    """:data:`RAY_ENV` (and ``OMP_NUM_THREADS=1``) for a driver in this process, restored after.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported, and a test session
    imports it while collecting (``services.workers.actors``): the constant it became is set
    here too, else ``ray.init(address="127.0.0.1:...")`` rewrites the address to the machine's
    outward one, where the head does not listen, and waits forever.
    """
    import ray._private.ray_constants as ray_constants

    names = [*RAY_ENV, "OMP_NUM_THREADS"]
    saved = {name: os.environ.get(name) for name in names}
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update({**RAY_ENV, "OMP_NUM_THREADS": "1"})  # local Ray's workers inherit it
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_node(
    args: list[str], root: Path, env: dict[str, str], name: str
) -> subprocess.Popen[bytes]:
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={root}",
        f"--object-store-memory={_OBJECT_STORE_BYTES}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
        *args,
    ]
    return start_process(command, root / f"{name}.log", env)


def _wait_for_nodes(
    address: str,
    count: int,
    processes: list[subprocess.Popen[bytes]],
    root: Path,
    env: dict[str, str],
    timeout: float,
) -> None:
    """Until the GCS lists ``count`` live nodes, asked by one probe process (pytest's own
    process may not be a Ray driver yet, or may become one of another cluster)."""
    probe = (
        "import time, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"while sum(1 for n in ray.nodes() if n['Alive']) < {count}:\n"
        "    time.sleep(0.5)\n"
    )
    prober = start_process([sys.executable, "-c", probe], root / "probe.log", env)
    try:
        wait_until(
            lambda: prober.poll() is not None,
            timeout,
            f"{count} Ray nodes to come up",
            root,
            watch=processes,
            poll_s=0.2,
        )
        if prober.returncode != 0:
            raise RuntimeError(
                f"the probe of {address} failed ({prober.returncode}); logs in {root}:\n"
                + log_tail(root)
            )
    finally:
        stop_process(prober)
