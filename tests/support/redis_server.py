"""A real Redis server for tests, on loopback, with its files in a temporary folder.

:func:`redis_server` starts ``redis-server`` (Debian package ``redis-server``) on a free 127.0.0.1
port with ``--dir`` in the given folder, no RDB snapshots and AOF as asked, and stops it by its PID
on exit. Starting it again on the same folder with AOF on reloads what the first one wrote, which is
how the tests check that jobs survive a restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

__all__ = ["RedisServerInfo", "find_redis_server", "redis_server"]

_PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class RedisServerInfo:
    """How to reach a running test Redis server.

    Attributes:
        host: always ``127.0.0.1``.
        port: the TCP port.
        pid: the server's process id.
        dir: its working folder (AOF files live under it).
        log_path: the server's log file.
    """

    host: str
    port: int
    pid: int
    dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A new client for this server (keyword arguments go to ``redis.Redis``)."""
        return redis.Redis(host=self.host, port=self.port, **kwargs)  # type: ignore[arg-type]


def find_redis_server() -> Path:
    """The ``redis-server`` binary on PATH (or in /usr/bin, where Debian puts it).

    Raises:
        RuntimeError: it is not installed.
    """
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if found:
        return Path(found)
    raise RuntimeError(
        "redis-server is missing, but the service tests need a real Redis; "
        "run scripts/install.sh to install it (apt package redis-server)"
    )


@contextmanager
def redis_server(
    tmp_dir: str | Path, appendonly: bool = True, start_timeout: float = 10.0
) -> Iterator[RedisServerInfo]:
    """Run ``redis-server`` with its files and log in ``tmp_dir``.

    Args:
        tmp_dir: a folder owned by the caller (created if missing); reusing one restarts on its data.
        appendonly: turn the append-only file on (``appendfsync everysec``, Redis's default).
        start_timeout: seconds to wait for the server to answer PING.

    Yields:
        where the server listens and its PID.

    Raises:
        RuntimeError: redis-server is missing, or it exited or did not answer in time; the message
            ends with the log's tail.
    """
    binary = str(find_redis_server())
    root = Path(tmp_dir)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "redis.log"
    process, port = _start(binary, root, log_path, appendonly, start_timeout)
    try:
        yield RedisServerInfo(
            host="127.0.0.1", port=port, pid=process.pid, dir=root, log_path=log_path
        )
    finally:
        _stop(process)


def _start(
    binary: str, root: Path, log_path: Path, appendonly: bool, timeout: float
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the server on a free port; return it once PING answers, with its port.

    Another process may bind the port between picking and binding it: such a clash is retried on
    a new port.
    """
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _free_port()
        command = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(root),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--daemonize",
            "no",  # stay our child, so we stop it by the PID we hold
            "--logfile",
            str(log_path),
        ]
        log_start = log_path.stat().st_size if log_path.exists() else 0
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in pytest must not kill it before cleanup
        )
        try:
            _wait_until_ping(process, port, log_path, timeout)
        except RuntimeError:
            _stop(process)
            port_taken = log_path.exists() and "Address already in use" in _read_from(
                log_path, log_start
            )
            if port_taken and attempt < _PORT_ATTEMPTS:
                continue
            raise
        except BaseException:
            _stop(process)
            raise
        return process, port
    raise AssertionError("the last attempt returns or raises")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_ping(
    process: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float
) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with code {process.returncode} before answering on "
                    f"port {port}; log {log_path}:\n{_log_tail(log_path)}"
                )
            try:
                if client.ping():
                    return
            except redis.exceptions.BusyLoadingError:
                pass  # still loading the AOF
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not answer PING on port {port} within {timeout:.0f} s; "
                    f"log {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(0.02)
    finally:
        client.close()


def _stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM (Redis flushes the AOF and exits), then SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _log_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
