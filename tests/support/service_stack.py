"""The distributed mode as real processes for tests and benchmarks: redis-server (AOF on), the
JuiceFS S3 gateway, a Ray head with CPUs for the actors, the dispatcher
(``python -m services.workers``) and the API (``genq serve``), all on loopback.

:func:`distributed_stack` starts them and stops every one on exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.api.settings import hash_api_key
from tests.support.processes import start_on_free_port, start_process, stop_process
from tests.support.ray_cluster import RAY_ENV, ray_cluster
from tests.support.redis_server import redis_server
from tests.support.s3_server import s3_server

__all__ = ["ServiceStack", "distributed_stack"]

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServiceStack:
    """A running stack.

    Attributes:
        url: the API's base URL.
        redis_url: the job store.
        dispatcher: the dispatcher process (stop it to leave submitted jobs queued).
        api: the API process.
        logs: the folder of every process's ``*.log``.
    """

    url: str
    redis_url: str
    dispatcher: subprocess.Popen[bytes]
    api: subprocess.Popen[bytes]
    logs: Path

    def log_tails(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


@contextmanager
def distributed_stack(
    root: Path, api_keys: Mapping[str, str], settings: Mapping[str, str] | None = None
) -> Iterator[ServiceStack]:
    """Start the stack with its files under ``root``.

    Args:
        root: an empty folder for data and logs.
        api_keys: ``{key: tenant}``.
        settings: more ``GENQ_*`` variables for the dispatcher and the API.
    """
    with ExitStack() as stack:
        # 1. the servers: Redis, S3, a Ray head with 2 CPUs (one actor of 1 CPU, one to spare)
        redis_info = stack.enter_context(redis_server(root / "redis", appendonly=True))
        s3 = stack.enter_context(s3_server(root / "s3"))
        ray_info = stack.enter_context(ray_cluster([], head_cpus=2))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        env.update(RAY_ENV)
        env.update(
            OMP_NUM_THREADS="1",
            GENQ_MODE="distributed",
            GENQ_REDIS_URL=redis_info.url,
            GENQ_S3_ENDPOINT=s3.endpoint,
            GENQ_S3_ACCESS_KEY=s3.access_key,
            GENQ_S3_SECRET_KEY=s3.secret_key,
            GENQ_API_KEYS=",".join(f"{hash_api_key(k)}={t}" for k, t in api_keys.items()),
            GENQ_RAY_ADDRESS=ray_info.address,
            GENQ_NUM_ACTORS="1",
            GENQ_ACTOR_NUM_CPUS="1",
            GENQ_THREADS="1",
            GENQ_ASSETS_DIR=str(REPO_ROOT / "benchmarks" / "assets"),
            GENQ_MODEL_CACHE_DIR=str(root / "model-cache"),
        )
        env.update(settings or {})
        # 2. the dispatcher and its actor, on the Ray cluster
        dispatcher = start_process(
            [sys.executable, "-m", "services.workers"], root / "dispatcher.log", env
        )
        stack.callback(stop_process, dispatcher, 60.0)
        # 3. the API, as `genq serve` runs it
        genq = str(Path(sys.executable).parent / "genq")
        api, port = start_on_free_port(
            lambda port: [genq, "serve", "--port", str(port), "--log-level", "warning"],
            _ready,
            what="genq serve",
            port_taken="address already in use",
            log_path=root / "api.log",
            timeout_s=60,
            env=env,
        )
        stack.callback(stop_process, api)
        yield ServiceStack(f"http://127.0.0.1:{port}", redis_info.url, dispatcher, api, root)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
