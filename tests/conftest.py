"""Shared pytest fixtures. Several areas add fixtures here; keep each block
self-contained and its heavy imports inside the fixture."""

from __future__ import annotations

import uuid

import pytest

# ------------------------------------------------------------------ Redis
# A real redis-server on a free 127.0.0.1 port, started by the tests
# themselves (nothing on disk, gone when the session ends).


def _start_redis():
    from dspark.cluster.redis_server import RedisServer, RedisServerError

    try:
        return RedisServer().start()
    except RedisServerError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server():
    """One local redis-server shared by the whole session. Do not kill it:
    tests that crash Redis use `private_redis_server`."""
    server = _start_redis()
    yield server
    server.close()


@pytest.fixture
def private_redis_server():
    """A redis-server owned by one test, free to kill() and restart()."""
    server = _start_redis()
    yield server
    server.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to the test, so tests sharing a server never collide."""
    return f"test-{uuid.uuid4().hex[:12]}"
