"""Fixtures of the job store and queue tests: a real redis-server per test module, emptied per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.redis_server import RedisServerInfo, redis_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerInfo]:
    with redis_server(tmp_path_factory.mktemp("redis"), appendonly=False) as info:
        yield info


@pytest.fixture
def client(server: RedisServerInfo) -> Iterator[redis.Redis]:
    client = server.client()
    client.flushdb()
    yield client
    client.close()
