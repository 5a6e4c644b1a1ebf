"""Cluster-wide state in Redis (redis-py asyncio): the connection and every operation on it.

The key layout (and the one server-side script) is in :mod:`dspark.cluster.redis_keys`;
how a verifier group follows its policy through outages is
:class:`~dspark.cluster.policy_follower.PolicyFollower`.

Heartbeat expiry uses Redis's clock (key TTLs), so hosts need not agree on time; arrival
buckets use the writer's clock (hosts are assumed NTP-synced).

Failure model: every method raises RedisUnavailable (a ConnectionError)
when Redis cannot be reached, fast (short socket timeouts, one retry), and
flips `connected` to False; the next call simply tries again, since redis-py
reconnects on demand.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dspark.cluster.redis_keys import PUBLISH_POLICY_LUA, Keys, check_name, check_role
from dspark.workers.scheduling import Demand, VerifyPolicy

log = logging.getLogger(__name__)

__all__ = ["RedisState", "RedisUnavailable", "StateConfig", "redact_url", "redis_errors"]


class RedisUnavailable(ConnectionError):
    """Redis could not be reached (refused, timed out, or dropped the connection)."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced, for logs and errors.

    >>> redact_url("rediss://user:s3cret@redis:6380/0")
    'rediss://user:***@redis:6380/0'
    """
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparsable url>"


@dataclass(frozen=True)
class StateConfig:
    """Where the cluster state lives and how patiently to talk to it."""

    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    """Redis server URL (DSPARK_REDIS_URL in deployments); may hold a password, so never logged."""
    prefix: str = "dspark"
    """Namespace of every key and channel; lets clusters share one Redis."""
    socket_timeout_s: float = 0.5
    """Per-command read timeout; keeps a dead Redis from stalling a step."""
    connect_timeout_s: float = 0.5
    """TCP connect timeout."""
    retries: int = 1
    """Immediate retries after a connection error (one covers a dropped pooled socket)."""
    heartbeat_ttl_s: float = 5.0
    """Default lifetime of a heartbeat; members heartbeat several times per TTL."""
    demand_ttl_s: float = 30.0
    """Demand of a group that stops reporting disappears after this long."""
    arrival_retention_s: int = 300
    """How long per-second arrival buckets are kept; the longest rate window."""

    def __post_init__(self) -> None:
        check_name("prefix", self.prefix)
        for name in ("socket_timeout_s", "connect_timeout_s", "heartbeat_ttl_s", "demand_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.retries < 0 or self.arrival_retention_s < 1:
            raise ValueError("retries must be >= 0 and arrival_retention_s >= 1")


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean Redis could not be reached."""
    import redis.exceptions as rex

    return (rex.ConnectionError, rex.TimeoutError, ConnectionError, TimeoutError, OSError)


def _policy_body(policy: VerifyPolicy) -> str:
    """A policy as stored in Redis: its JSON without the version (Redis numbers publications)."""
    return json.dumps({k: v for k, v in policy.to_dict().items() if k != "version"}, sort_keys=True, allow_nan=False)


class RedisState:
    """Async access to the cluster state. One instance per process is enough.

        state = RedisState(StateConfig(url=url))
        await state.heartbeat("verifier", "vg0", {"address": "127.0.0.1:5000"})
        await state.put_demand("vg0", Demand(active_requests=3))
        version = (await state.publish_policy("vg0", VerifyPolicy(max_block_len=4))).version
        await state.close()
    """

    def __init__(self, config: StateConfig | None = None) -> None:
        import redis.asyncio as aioredis  # lazy: redis is a serving extra
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.config = config or StateConfig()
        self.keys = Keys(self.config.prefix)
        self._errors = redis_errors()
        self._redis = aioredis.Redis.from_url(
            self.config.url,
            socket_timeout=self.config.socket_timeout_s,
            socket_connect_timeout=self.config.connect_timeout_s,
            retry=Retry(NoBackoff(), self.config.retries),
            decode_responses=True,
            health_check_interval=0,
        )
        self._publish_script = self._redis.register_script(PUBLISH_POLICY_LUA)
        self._last_published: dict[str, int] = {}
        self._connected = False

    @property
    def connected(self) -> bool:
        """Whether the most recent call reached Redis."""
        return self._connected

    async def run(self, what: str, op):
        """Await op(), translating connection failures into RedisUnavailable (and tracking `connected`)."""
        try:
            result = await op()
        except self._errors as exc:
            if self._connected:
                log.warning("redis unreachable during %s: %s", what, exc)
            self._connected = False
            raise RedisUnavailable(f"redis unreachable during {what}: {exc}") from exc
        if not self._connected:
            log.info("redis reachable at %s", redact_url(self.config.url))
        self._connected = True
        return result

    async def ping(self) -> bool:
        """True if Redis answers; never raises for connection problems."""
        try:
            return bool(await self.run("ping", self._redis.ping))
        except RedisUnavailable:
            return False

    async def close(self) -> None:
        await self._redis.aclose()

    def pubsub(self):
        """A redis-py PubSub on this connection (subscribe and read through run())."""
        return self._redis.pubsub(ignore_subscribe_messages=True)

    async def __aenter__(self) -> "RedisState":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ heartbeats

    async def heartbeat(
        self,
        role: str,
        member: str,
        info: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> None:
        """Mark `member` of `role` alive for ttl_s seconds (default config.heartbeat_ttl_s).

        `info` (JSON-serialisable, e.g. the member's address) is returned by alive().
        """
        role = check_role(role)
        check_name("member", member)
        ttl_s = self.config.heartbeat_ttl_s if ttl_s is None else ttl_s
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        ttl_ms = max(1, int(round(ttl_s * 1000)))
        try:
            payload = json.dumps(dict(info or {}), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"heartbeat info must be JSON-serialisable: {exc}") from exc

        async def op():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.heartbeat(role, member), payload, px=ttl_ms)
                pipe.sadd(self.keys.members(role), member)
                await pipe.execute()

        await self.run("heartbeat", op)

    async def alive(self, role: str) -> dict[str, dict[str, Any]]:
        """Members of `role` whose heartbeat has not expired: {member: info}."""
        role = check_role(role)

        async def op():
            members = sorted(await self._redis.smembers(self.keys.members(role)))
            if not members:
                return {}
            values = await self._redis.mget([self.keys.heartbeat(role, m) for m in members])
            dead = [m for m, v in zip(members, values) if v is None]
            if dead:
                await self._redis.srem(self.keys.members(role), *dead)
            return {m: v for m, v in zip(members, values) if v is not None}

        raw = await self.run("alive", op)
        out = {}
        for member, value in raw.items():
            try:
                info = json.loads(value)
            except json.JSONDecodeError:
                info = None
            out[member] = info if isinstance(info, dict) else {}
        return out

    async def remove_member(self, role: str, member: str) -> None:
        """Drop a member at once (graceful shutdown) instead of waiting for its TTL."""
        role = check_role(role)
        check_name("member", member)

        async def op():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.heartbeat(role, member))
                pipe.srem(self.keys.members(role), member)
                await pipe.execute()

        await self.run("remove_member", op)

    # ------------------------------------------------------------ demand

    async def put_demand(self, group: str, demand: Demand) -> Demand:
        """Store a group's demand (stamped with the current time if its timestamp is 0)."""
        check_name("group", group)
        if demand.timestamp <= 0:
            demand = dataclasses.replace(demand, timestamp=time.time())
        key = self.keys.demand(group)

        async def op():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=demand.to_fields())
                pipe.pexpire(key, int(self.config.demand_ttl_s * 1000))
                pipe.sadd(self.keys.demand_groups(), group)
                await pipe.execute()

        await self.run("put_demand", op)
        return demand

    async def get_demand(self, group: str) -> Demand | None:
        """A group's latest demand, or None if it never reported or it expired."""
        check_name("group", group)
        fields = await self.run("get_demand", lambda: self._redis.hgetall(self.keys.demand(group)))
        return Demand.from_fields(fields) if fields else None

    async def all_demand(self) -> dict[str, Demand]:
        """{group: demand} for every group with unexpired demand."""

        async def op():
            groups = sorted(await self._redis.smembers(self.keys.demand_groups()))
            if not groups:
                return {}
            async with self._redis.pipeline(transaction=False) as pipe:
                for g in groups:
                    pipe.hgetall(self.keys.demand(g))
                rows = await pipe.execute()
            gone = [g for g, row in zip(groups, rows) if not row]
            if gone:
                await self._redis.srem(self.keys.demand_groups(), *gone)
            return {g: row for g, row in zip(groups, rows) if row}

        rows = await self.run("all_demand", op)
        out = {}
        for group, row in rows.items():
            try:
                out[group] = Demand.from_fields(row)
            except ValueError as exc:
                log.warning("ignoring malformed demand of group %s: %s", group, exc)
        return out

    # ------------------------------------------------------------ arrivals

    async def record_arrivals(self, count: int = 1, now: float | None = None) -> None:
        """Count `count` requests arriving at a router at time `now` (default: now)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        second = int(math.floor(time.time() if now is None else now))
        key = self.keys.arrivals_bucket(second)

        async def op():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(key, count)
                pipe.expire(key, self.config.arrival_retention_s + 1)
                pipe.incrby(self.keys.arrivals_total(), count)
                await pipe.execute()

        await self.run("record_arrivals", op)

    async def arrival_rate(self, window_s: int = 10, now: float | None = None) -> float:
        """Requests per second over the last `window_s` complete seconds.

        The current, partial second is left out, so the figure lags by under a
        second but never reads low because a second has only just begun.
        """
        if isinstance(window_s, bool) or not isinstance(window_s, int):
            raise ValueError(f"window_s must be an int, got {window_s!r}")
        if not 1 <= window_s <= self.config.arrival_retention_s:
            raise ValueError(f"window_s must be in [1, {self.config.arrival_retention_s}]")
        current = int(math.floor(time.time() if now is None else now))
        keys = [self.keys.arrivals_bucket(s) for s in range(current - window_s, current)]
        counts = await self.run("arrival_rate", lambda: self._redis.mget(keys))
        return sum(int(c) for c in counts if c is not None) / window_s

    async def arrivals_total(self) -> int:
        """All arrivals ever recorded (since Redis last lost its data)."""
        value = await self.run("arrivals_total", lambda: self._redis.get(self.keys.arrivals_total()))
        return int(value or 0)

    # ------------------------------------------------------------ policy

    async def publish_policy(self, group: str, policy: VerifyPolicy) -> VerifyPolicy:
        """Store `policy` for `group` under a new version and poke subscribers.

        The version comes from Redis (INCR), never lower than the last one this
        instance published for the group. Returns the policy with its version.
        """
        check_name("group", group)
        body = _policy_body(policy)
        keys = [self.keys.policy_version(group), self.keys.policy(group)]
        args = [body, self._last_published.get(group, 0), repr(time.time()), self.keys.policy_channel(group)]
        version = int(await self.run("publish_policy", lambda: self._publish_script(keys=keys, args=args)))
        self._last_published[group] = version
        return policy.with_version(version)

    async def get_policy_version(self, group: str) -> int:
        """Latest published version for `group` (0 if none). One cheap GET."""
        check_name("group", group)
        value = await self.run("get_policy_version", lambda: self._redis.get(self.keys.policy_version(group)))
        return int(value or 0)

    async def pin_policy(self, policy: VerifyPolicy | None) -> None:
        """Pin ``policy`` for every verifier group (the scheduler publishes it at its next round
        instead of the policy demand calls for), or with None lift the pin."""
        key = self.keys.policy_pin()
        if policy is None:
            await self.run("unpin_policy", lambda: self._redis.delete(key))
            return
        body = _policy_body(policy)
        await self.run("pin_policy", lambda: self._redis.set(key, body))

    async def get_policy_pin(self) -> VerifyPolicy | None:
        """The pinned policy (version 0), or None when nothing is pinned."""
        raw = await self.run("get_policy_pin", lambda: self._redis.get(self.keys.policy_pin()))
        if raw is None:
            return None
        try:
            return VerifyPolicy.from_json(raw)
        except ValueError as exc:
            raise ValueError(f"malformed pinned policy: {exc}") from exc

    async def get_policy(self, group: str) -> VerifyPolicy | None:
        """The latest published policy for `group`, or None if none was published."""
        check_name("group", group)
        row = await self.run("get_policy", lambda: self._redis.hgetall(self.keys.policy(group)))
        if not row:
            return None
        try:
            version = int(row["version"])
            return VerifyPolicy.from_json(row["policy"]).with_version(version)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed policy for group {group}: {exc}") from exc
