"""A real Redis server for tests, on loopback, with its files in a temporary folder.

:func:`redis_server` starts ``redis-server`` (Debian package ``redis-server``) on a free 127.0.0.1
port with ``--dir`` in the given folder, no RDB snapshots and AOF as asked, and stops it by its PID
on exit. Starting it again on the same folder with AOF on reloads what the first one wrote, which is
how the tests check that jobs survive a restart.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from services.stack import redis_command
from tests.support.processes import start_on_free_port, stop_process

__all__ = ["RedisServerInfo", "find_redis_server", "redis_server"]


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

    def command(port: int) -> list[str]:
        # in the foreground: it stays our child, stopped by the PID we hold; it logs to stdout
        return redis_command(binary, port, root, appendonly)

    process, port = start_on_free_port(
        command,
        _answers_ping,
        what="redis-server",
        port_taken="Address already in use",
        log_path=log_path,
        timeout_s=start_timeout,
    )
    try:
        yield RedisServerInfo(
            host="127.0.0.1", port=port, pid=process.pid, dir=root, log_path=log_path
        )
    finally:
        stop_process(process)  # on SIGTERM Redis flushes the AOF and exits


def _answers_ping(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return False  # not listening yet, or still loading the AOF (BusyLoadingError)
    finally:
        client.close()
