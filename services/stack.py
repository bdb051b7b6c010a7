"""``genq stack up | down | status``: the distributed topology as processes on one machine.

``up`` starts, in order, redis-server (AOF on), an S3 server (the JuiceFS gateway, MinIO's
gateway code), a Ray head, N Ray worker nodes, the dispatcher (``python -m services.workers``)
and the API (``genq serve``), each on 127.0.0.1, and waits until each answers before the next.
Everything lives in one folder (default ``runs/stack``)::

    stack.json        what was started: PIDs, ports, URLs (written after every step)
    stack.env         GENQ_* settings and secrets of this stack (mode 0600), for `source`
    logs/<name>.log   one log per process
    redis/, s3/       their data (kept between runs)

The processes run in sessions of their own and outlive ``up``. ``down`` stops exactly what
``stack.json`` names, newest first, and only a process whose PID still has the start time
recorded for it (a PID the system reused for something else is left alone); Ray's own processes
are found by the cluster's temporary folder in their command line. ``status`` says which are
running. A failed ``up`` stops what it had started and names the process and its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.api.settings import hash_api_key

__all__ = [
    "ComponentState",
    "LocalStack",
    "StackError",
    "StackState",
    "describe",
    "juicefs_format_command",
    "juicefs_gateway_command",
    "kill_processes_naming",
    "loopback_name",
    "redis_command",
]

STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
"""What Ray needs on a single machine: nodes bound to loopback, no cluster auth token."""


class StackError(RuntimeError):
    """A stack that can't start or stop as asked; the message says which process and why."""


@dataclass
class ComponentState:
    """One started process: ``pid`` with its ``start_time`` (clock ticks after boot, from
    ``/proc``), so that a reused PID is never taken for it."""

    name: str
    pid: int
    start_time: int
    log: str
    port: int | None = None


@dataclass
class StackState:
    """What ``stack.json`` holds."""

    components: list[ComponentState] = field(default_factory=list)
    ray_temp_dir: str | None = None
    urls: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> StackState:
        raw = json.loads(path.read_text())
        return cls(
            components=[ComponentState(**c) for c in raw.get("components", [])],
            ray_temp_dir=raw.get("ray_temp_dir"),
            urls=raw.get("urls", {}),
        )

    def save(self, path: Path) -> None:
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(partial, path)


class LocalStack:
    """The stack of one folder.

    Args:
        folder: where its state, logs and data live.
        workers: Ray worker nodes (each runs job actors).
        worker_cpus: CPUs each worker node offers (one actor each by default).
        api_port: the API's port (``None``: a free one).
        assets_dir: the built-in models (default ``benchmarks/assets`` under the current folder).
        start_timeout_s: the longest wait for one process to answer.
        object_store_bytes: each Ray node's object store (stages hand off through S3, not Ray).
    """

    def __init__(
        self,
        folder: Path,
        *,
        workers: int = 1,
        worker_cpus: int = 1,
        api_port: int | None = None,
        assets_dir: Path | None = None,
        start_timeout_s: float = 120.0,
        object_store_bytes: int = 256 * 1024**2,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.folder = folder.resolve()
        self.workers = workers
        self.worker_cpus = worker_cpus
        self.api_port = api_port
        self.assets_dir = (assets_dir or Path("benchmarks/assets")).resolve()
        self.start_timeout_s = start_timeout_s
        self.object_store_bytes = object_store_bytes
        self._bin = Path(sys.executable).parent

    # ---- the three commands ------------------------------------------------------------------

    def up(self) -> StackState:
        """Start every process; returns the state (also in ``stack.json``).

        Raises:
            StackError: the stack already runs, a program is missing, or a process did not start
                (what was started is stopped again).
        """
        if any(running for _, running in self.status()):
            raise StackError(f"a stack already runs from {self.folder}: genq stack down first")
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        state = StackState()
        try:
            self._start_all(state)
        except BaseException:
            self._stop(state)
            raise
        return state

    def down(self) -> list[str]:
        """Stop what ``stack.json`` names; returns the names of the processes stopped."""
        path = self.folder / STATE_FILE
        if not path.exists():
            return []
        stopped = self._stop(StackState.load(path))
        path.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[tuple[ComponentState, bool]]:
        """Each recorded process and whether it still runs."""
        path = self.folder / STATE_FILE
        if not path.exists():
            return []
        return [(c, _alive(c)) for c in StackState.load(path).components]

    def env(self) -> dict[str, str]:
        """The client settings of the running stack (``GENQ_SERVER``, ``GENQ_API_KEY``)."""
        path = self.folder / ENV_FILE
        if not path.exists():
            raise StackError(f"no stack in {self.folder}: genq stack up first")
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return {k.removeprefix("export "): v for k, v in pairs}

    # ---- starting --------------------------------------------------------------------------

    def _start_all(self, state: StackState) -> None:
        secrets_ = self._secrets()
        # 1. Redis, with AOF, its data kept in the folder
        redis_port = _free_port()
        redis_dir = self.folder / "redis"
        redis_dir.mkdir(exist_ok=True)
        self._start(
            state,
            "redis",
            redis_command(_which_or_raise("redis-server"), redis_port, redis_dir),
            port=redis_port,
            ready=lambda: _redis_answers(redis_port),
        )
        redis_url = f"redis://127.0.0.1:{redis_port}/0"

        # 2. the S3 server: a JuiceFS volume in the folder behind MinIO's gateway
        s3_port = _free_port()
        s3_dir = self.folder / "s3"
        meta = f"sqlite3://{s3_dir / 'meta.db'}"
        s3_env = {
            **os.environ,
            "HOME": str(s3_dir / "home"),
            "MINIO_ROOT_USER": secrets_["s3_access_key"],
            "MINIO_ROOT_PASSWORD": secrets_["s3_secret_key"],
        }
        (s3_dir / "home").mkdir(parents=True, exist_ok=True)
        if not (s3_dir / "meta.db").exists():
            _run_checked(
                juicefs_format_command(_which_or_raise("juicefs"), s3_dir / "data", meta),
                s3_env,
                "juicefs format",
            )
        self._start(
            state,
            "s3",
            juicefs_gateway_command(_which_or_raise("juicefs"), meta, s3_dir / "cache", s3_port),
            env=s3_env,
            port=s3_port,
            ready=lambda: _http_ok(f"http://127.0.0.1:{s3_port}/minio/health/live"),
        )

        # 3. the Ray cluster: a head without CPUs, then the worker nodes
        ray_dir = Path(tempfile.mkdtemp(prefix="genqstack-", dir="/tmp"))  # short: unix sockets
        state.ray_temp_dir = str(ray_dir)
        ray_env = {**os.environ, **RAY_ENV, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        head_port = _free_port()
        ray_address = f"127.0.0.1:{head_port}"

        def node_args() -> list[str]:  # each node its own agent ports
            return ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={ray_dir}",
                    "--disable-usage-stats", f"--object-store-memory={self.object_store_bytes}",
                    f"--dashboard-agent-listen-port={_free_port()}",
                    f"--dashboard-agent-grpc-port={_free_port()}",
                    f"--runtime-env-agent-port={_free_port()}",
                    f"--metrics-export-port={_free_port()}"]  # fmt: skip

        ray = str(self._bin / "ray")
        self._start(
            state,
            "ray-head",
            [ray, "start", "--head", f"--port={head_port}", "--num-cpus=0",
             "--include-dashboard=false", f"--ray-client-server-port={_free_port()}", *node_args()],
            env=ray_env,
            port=head_port,
            ready=self._ray_nodes(ray_address, 1, ray_env),
        )  # fmt: skip
        # a joining node refuses the loopback setting and rewrites 127.0.0.1 in --address to the
        # machine's outward address: it gets the setting at 1 and another name of 127.0.0.1
        joining = {**ray_env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        for index in range(self.workers):
            self._start(
                state,
                f"ray-worker-{index}",
                [ray, "start", f"--address={loopback_name()}:{head_port}",
                 f"--num-cpus={self.worker_cpus}", *node_args()],
                env=joining,
                ready=self._ray_nodes(ray_address, index + 2, ray_env),
            )  # fmt: skip

        # 4. the dispatcher and the API, with this stack's settings
        api_port = self.api_port or _free_port()
        settings = {
            "GENQ_MODE": "distributed",
            "GENQ_REDIS_URL": redis_url,
            "GENQ_S3_ENDPOINT": f"127.0.0.1:{s3_port}",
            "GENQ_S3_ACCESS_KEY": secrets_["s3_access_key"],
            "GENQ_S3_SECRET_KEY": secrets_["s3_secret_key"],
            "GENQ_API_KEYS": f"{hash_api_key(secrets_['api_key'])}=local",
            "GENQ_RAY_ADDRESS": ray_address,
            "GENQ_NUM_ACTORS": str(self.workers),
            "GENQ_ACTOR_NUM_CPUS": str(self.worker_cpus),
            "GENQ_ASSETS_DIR": str(self.assets_dir),
            "GENQ_MODEL_CACHE_DIR": str(self.folder / "model-cache"),
        }
        service_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")},
            **RAY_ENV,
            **settings,
        }
        dispatcher_log = self.folder / "logs" / "dispatcher.log"
        self._start(
            state,
            "dispatcher",
            [sys.executable, "-m", "services.workers"],
            env=service_env,
            ready=lambda: "workers, reclaim after" in _read(dispatcher_log),
        )
        self._start(
            state,
            "api",
            [str(self._bin / "genq"), "serve", "--port", str(api_port), "--log-level", "warning"],
            env=service_env,
            port=api_port,
            ready=lambda: _http_ok(f"http://127.0.0.1:{api_port}/readyz"),
        )
        state.urls = {"api": f"http://127.0.0.1:{api_port}", "s3": f"127.0.0.1:{s3_port}"}
        state.save(self.folder / STATE_FILE)
        client = {"GENQ_SERVER": state.urls["api"], "GENQ_API_KEY": secrets_["api_key"]}
        self._write_env({**settings, **client})

    def _start(
        self,
        state: StackState,
        name: str,
        command: Sequence[str],
        *,
        ready: Callable[[], bool],
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        log = self.folder / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            try:
                process = subprocess.Popen(
                    list(command),
                    env=dict(env) if env is not None else None,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives `genq stack up` and its terminal
                )
            except OSError as err:
                raise StackError(f"{name} could not start: {command[0]}: {err}") from None
        component = ComponentState(name, process.pid, _start_time(process.pid), str(log), port)
        state.components.append(component)
        state.save(self.folder / STATE_FILE)
        deadline = time.monotonic() + self.start_timeout_s
        while not ready():
            if process.poll() is not None:
                raise StackError(
                    f"{name} exited with code {process.returncode} while starting; log {log}:\n"
                    + _tail(log)
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{name} did not answer within {self.start_timeout_s:.0f} s; log {log}:\n"
                    + _tail(log)
                )
            time.sleep(0.2)

    def _ray_nodes(self, address: str, count: int, env: Mapping[str, str]) -> Callable[[], bool]:
        """A readiness check: true once the cluster lists ``count`` live nodes.

        One probe process connects once and polls the node list (connecting again and again
        would take the CPU the starting node needs); the check only asks whether it is done.
        """
        probe = (
            "import ray, time\n"
            f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
            f"deadline = time.monotonic() + {self.start_timeout_s}\n"  # never outlives the wait
            f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
            "    assert time.monotonic() < deadline, 'nodes did not come up'\n"
            "    time.sleep(0.5)\n"
        )
        log = self.folder / "logs" / "ray-probe.log"
        process: subprocess.Popen[bytes] | None = None

        def ready() -> bool:
            nonlocal process
            if process is None:
                with open(log, "ab") as out:
                    process = subprocess.Popen(
                        [sys.executable, "-c", probe], env=dict(env), stdout=out, stderr=out
                    )
            code = process.poll()
            if code is None:
                return False
            if code != 0:  # it could not connect: ask again
                process = None
                return False
            return True

        return ready

    def _secrets(self) -> dict[str, str]:
        """This stack's S3 keys and API key, made once and kept in ``stack.env``."""
        known = self.env() if (self.folder / ENV_FILE).exists() else {}
        return {
            "s3_access_key": known.get("GENQ_S3_ACCESS_KEY") or "genq-" + secrets.token_hex(6),
            "s3_secret_key": known.get("GENQ_S3_SECRET_KEY") or secrets.token_urlsafe(24),
            "api_key": known.get("GENQ_API_KEY") or "genq-" + secrets.token_urlsafe(24),
        }

    def _write_env(self, values: Mapping[str, str]) -> None:
        path = self.folder / ENV_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            for name, value in values.items():
                out.write(f"export {name}={value}\n")

    # ---- stopping --------------------------------------------------------------------------

    def _stop(self, state: StackState) -> list[str]:
        stopped = []
        for component in reversed(state.components):  # the API first, Redis last
            if _alive(component):
                _terminate(component.pid, timeout_s=30.0 if "ray" in component.name else 10.0)
                stopped.append(component.name)
        if state.ray_temp_dir:  # whatever of Ray outlived its `ray start --block`
            kill_processes_naming(state.ray_temp_dir)
            shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
        return stopped


# ---- helpers ---------------------------------------------------------------------------------


def redis_command(binary: str, port: int, folder: Path, appendonly: bool = True) -> list[str]:
    """redis-server on 127.0.0.1:``port`` with its files in ``folder``, no RDB snapshots, AOF as
    asked, in the foreground (stopped by its PID; it flushes the AOF on SIGTERM)."""
    return [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
            "--save", "", "--appendonly", "yes" if appendonly else "no",
            "--daemonize", "no"]  # fmt: skip


def juicefs_format_command(binary: str, data_dir: Path, meta_url: str) -> list[str]:
    """Make the JuiceFS volume ``genq``: objects as files under ``data_dir``, metadata at
    ``meta_url`` (``sqlite3://...``)."""
    return [binary, "format", "--storage", "file", "--bucket", f"{data_dir}/", meta_url, "genq"]


def juicefs_gateway_command(binary: str, meta_url: str, cache_dir: Path, port: int) -> list[str]:
    """The S3 gateway of that volume on 127.0.0.1:``port`` (credentials from ``MINIO_ROOT_*``;
    it creates ``$HOME/.minio``). Its metrics port is a free one: the default clashes between
    servers."""
    return [binary, "gateway", "--multi-buckets", "--keep-etag",
            "--object-meta",  # keep each object's Content-Type instead of guessing from its name
            "--no-usage-report", "--no-banner", "--no-bgjob", "--metrics", "127.0.0.1:0",
            "--cache-dir", str(cache_dir), meta_url, f"127.0.0.1:{port}"]  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _which(program: str) -> str | None:
    """``program`` next to this Python (the venv: juicefs), on PATH, or where Debian puts it."""
    here = Path(sys.executable).parent
    return shutil.which(program, path=f"{here}:{os.environ.get('PATH', '')}:/usr/bin:/usr/sbin")


def _which_or_raise(program: str) -> str:
    found = _which(program)
    if found is None:
        raise StackError(f"{program} is not installed: run scripts/install.sh")
    return found


def _run_checked(command: Sequence[str], env: Mapping[str, str], what: str) -> None:
    result = subprocess.run(
        list(command), env=dict(env), capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise StackError(f"{what} failed ({result.returncode}):\n{result.stderr[-2000:]}")


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks after boot (``/proc/PID/stat`` field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(component: ComponentState) -> bool:
    """Whether the recorded process still runs (same PID and start time, not a zombie)."""
    try:
        same = _start_time(component.pid) == component.start_time
    except (OSError, ValueError, IndexError):
        return False
    return same and _running(component.pid)


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns once the PID is gone or a zombie."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_processes_naming(marker: str) -> None:
    """SIGKILL every process (but this one) whose command line contains ``marker``."""
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def loopback_name() -> str:
    """A name of 127.0.0.1 that a joining Ray node does not rewrite (the host name, or 127.1)."""
    name = socket.gethostname()
    try:
        if socket.gethostbyname(name) == "127.0.0.1":
            return name
    except OSError:
        pass
    return "127.1"


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])


def describe(stack: LocalStack) -> list[dict[str, Any]]:
    """``status`` as rows for printing: name, pid, port, running, log."""
    return [
        {"name": c.name, "pid": c.pid, "port": c.port, "running": running, "log": c.log}
        for c, running in stack.status()
    ]
