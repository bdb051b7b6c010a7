"""Fixtures for the API tests: a real redis-server and a real S3 server (JuiceFS gateway) per test
module, an emptied Redis per test, and the app built on them (``api``), driven by TestClient."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.settings import ApiSettings, hash_api_key
from services.common.jobstore import JobStore
from tests.support.api_testing import BASE_URL, KEY_ACME, KEY_GLOBEX
from tests.support.redis_server import RedisServerInfo, redis_server
from tests.support.s3_server import S3ServerInfo, s3_server

SettingsFactory = Callable[..., ApiSettings]
ClientFactory = Callable[..., TestClient]


@pytest.fixture(scope="module")
def redis_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerInfo]:
    with redis_server(tmp_path_factory.mktemp("redis"), appendonly=False) as info:
        yield info


@pytest.fixture(scope="module")
def s3_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3ServerInfo]:
    with s3_server(tmp_path_factory.mktemp("s3")) as info:
        yield info


@pytest.fixture
def redis_client(redis_info: RedisServerInfo) -> Iterator[redis.Redis]:
    client = redis_info.client(socket_timeout=5)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    """The job store the API writes, for driving jobs as a worker would."""
    return JobStore(redis_client)


@pytest.fixture
def make_settings(redis_info: RedisServerInfo, s3_info: S3ServerInfo) -> SettingsFactory:
    """Distributed-mode settings for the test servers; keyword arguments override fields."""

    def make(**overrides: Any) -> ApiSettings:
        fields: dict[str, Any] = {
            "mode": "distributed",
            "redis_url": redis_info.url,
            "s3_endpoint": s3_info.endpoint,
            "s3_access_key": s3_info.access_key,
            "s3_secret_key": s3_info.secret_key,
            "api_keys": [f"{hash_api_key(KEY_ACME)}=acme", f"{hash_api_key(KEY_GLOBEX)}=globex"],
            "public_base_url": BASE_URL,
            "events_block_ms": 200,
        }
        fields.update(overrides)
        return ApiSettings(**fields)

    return make


@pytest.fixture
def make_client(
    make_settings: SettingsFactory, redis_client: redis.Redis
) -> Iterator[ClientFactory]:
    """``make_client(**settings overrides)``: a started app (lifespan run) on the test servers."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        app = create_app(make_settings(**overrides), redis=redis_client)
        client = TestClient(app, base_url=BASE_URL)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_client: ClientFactory) -> TestClient:
    """The app with default settings."""
    return make_client()
