"""Cluster state against a real local redis-server (started by conftest fixtures)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("redis")

from dspark.cluster.redis_server import RedisServerError, ensure_redis_server, ping  # noqa: E402
from dspark.cluster.policy_follower import PolicyFollower  # noqa: E402
from dspark.cluster.policy_subscription import PolicySubscription  # noqa: E402
from dspark.cluster.redis_keys import Keys  # noqa: E402
from dspark.cluster.redis_state import RedisState, RedisUnavailable, StateConfig  # noqa: E402
from dspark.workers.scheduling import Demand, VerifyPolicy  # noqa: E402


def run(coro, timeout_s: float = 20.0):
    """Run one async test body; a hang fails the test instead of stalling the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def make_state(server, prefix: str, **overrides) -> RedisState:
    return RedisState(StateConfig(url=server.url, prefix=prefix, **overrides))


# ------------------------------------------------------------------ server


def test_ensure_redis_server_explains_how_to_install() -> None:
    with pytest.raises(RedisServerError, match="apt-get install -y redis-server"):
        ensure_redis_server("dspark-no-such-redis-server")


def test_private_server_kill_and_restart_on_same_port(private_redis_server) -> None:
    server = private_redis_server
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.ping()
    port = server.port
    server.kill()
    assert not server.running and not ping("127.0.0.1", port, timeout=0.2)
    server.restart()
    assert server.port == port and server.ping()


# ------------------------------------------------------------------ heartbeats


def test_heartbeat_ttl_expiry(redis_server, redis_prefix) -> None:
    async def body():
        async with make_state(redis_server, redis_prefix) as state:
            await state.heartbeat("verifier", "vg0", {"address": "127.0.0.1:5001"}, ttl_s=0.3)
            await state.heartbeat("verifier", "vg1", {"address": "127.0.0.1:5002"}, ttl_s=30)
            await state.heartbeat("drafter", "d0")
            alive = await state.alive("verifier")
            assert alive == {"vg0": {"address": "127.0.0.1:5001"}, "vg1": {"address": "127.0.0.1:5002"}}
            assert await state.alive("drafter") == {"d0": {}}
            assert await state.alive("router") == {}

            await asyncio.sleep(0.45)
            assert set(await state.alive("verifier")) == {"vg1"}
            # The expired member was pruned from the index, not just hidden.
            assert await state._redis.smembers(state.keys.members("verifier")) == {"vg1"}

            await state.heartbeat("verifier", "vg0", ttl_s=30)  # comes back
            await state.remove_member("verifier", "vg1")  # leaves gracefully
            assert set(await state.alive("verifier")) == {"vg0"}
            assert state.connected

            with pytest.raises(ValueError):
                await state.heartbeat("oracle", "x")
            with pytest.raises(ValueError):
                await state.heartbeat("router", "has space")
            with pytest.raises(ValueError):
                await state.heartbeat("router", "r0", {"bad": object()})

    run(body())


# ------------------------------------------------------------------ demand


def test_demand_round_trip_and_expiry(redis_server, redis_prefix) -> None:
    async def body():
        async with make_state(redis_server, redis_prefix, demand_ttl_s=0.3) as state:
            before = time.time()
            sent = Demand(
                active_requests=12,
                queued_requests=3,
                tokens_per_step=41.5,
                step_latency_s=0.0234,
                mean_acceptance_length=3.1,
            )
            stored = await state.put_demand("vg0", sent)
            assert stored.timestamp >= before  # stamped by the writer
            assert await state.get_demand("vg0") == stored
            explicit = Demand(active_requests=1, timestamp=1234.5)
            assert await state.put_demand("vg1", explicit) == explicit
            assert await state.all_demand() == {"vg0": stored, "vg1": explicit}
            assert await state.get_demand("nobody") is None

            await asyncio.sleep(0.45)
            assert await state.all_demand() == {}
            assert await state._redis.smembers(state.keys.demand_groups()) == set()

    run(body())


def test_demand_fields_and_json_validation() -> None:
    d = Demand(active_requests=2, step_latency_s=0.1 + 0.2)
    assert Demand.from_fields(d.to_fields()) == d  # repr keeps floats exact
    assert Demand.from_json(d.to_json()) == d
    with pytest.raises(ValueError):
        Demand(active_requests=-1)
    with pytest.raises(ValueError):
        Demand(active_requests=True)
    with pytest.raises(ValueError):
        Demand.from_fields({"active_requests": "lots"})
    with pytest.raises(ValueError):
        Demand.from_fields({"step_latency_s": "nan"})


# ------------------------------------------------------------------ arrivals


def test_arrival_rate_window(redis_server, redis_prefix) -> None:
    async def body():
        async with make_state(redis_server, redis_prefix) as state:
            await state.record_arrivals(10, now=1000.5)
            await state.record_arrivals(5, now=1003.9)
            await state.record_arrivals(100, now=1005.1)  # the current second: not counted yet
            assert await state.arrival_rate(5, now=1005.2) == pytest.approx(15 / 5)
            assert await state.arrival_rate(2, now=1005.2) == pytest.approx(5 / 2)
            assert await state.arrival_rate(1, now=1006.0) == pytest.approx(100.0)
            assert await state.arrivals_total() == 115
            # Real-time use: arrivals now show up within the next second.
            await state.record_arrivals()
            assert await state.arrival_rate(3, now=time.time() + 1) >= 1 / 3
            with pytest.raises(ValueError):
                await state.record_arrivals(0)
            with pytest.raises(ValueError):
                await state.arrival_rate(10**6)

    run(body())


# ------------------------------------------------------------------ policy


def test_policy_versions_increment_and_poke_subscribers(redis_server, redis_prefix) -> None:
    async def body():
        async with make_state(redis_server, redis_prefix) as scheduler, make_state(
            redis_server, redis_prefix
        ) as verifier:
            assert await verifier.get_policy("vg0") is None
            assert await verifier.get_policy_version("vg0") == 0

            async with PolicySubscription(verifier, "vg0") as sub, PolicySubscription(verifier, "vg1") as other:
                p1 = await scheduler.publish_policy("vg0", VerifyPolicy(max_block_len=4))
                p2 = await scheduler.publish_policy(
                    "vg0", VerifyPolicy(max_block_len=8, survival_floor=0.25, budget_mode="algorithm1")
                )
                assert (p1.version, p2.version) == (1, 2)
                assert await sub.get(timeout_s=2) == 1
                assert await sub.get(timeout_s=2) == 2
                assert await other.get(timeout_s=0.1) is None  # other groups' pokes stay apart
                assert await sub.get(timeout_s=0.1) is None

            assert await verifier.get_policy_version("vg0") == 2
            got = await verifier.get_policy("vg0")
            assert got == p2 and got.version == 2 and got.budget_mode == "algorithm1"
            # Another publisher continues the same sequence.
            p3 = await verifier.publish_policy("vg0", VerifyPolicy())
            assert p3.version == 3
            assert (await scheduler.publish_policy("vg1", VerifyPolicy())).version == 1  # per group

    run(body())


def test_a_pinned_policy_round_trips_and_lifts(redis_server, redis_prefix) -> None:
    async def body():
        async with make_state(redis_server, redis_prefix) as st:
            assert await st.get_policy_pin() is None
            pin = VerifyPolicy(version=9, max_block_len=3, speculation_gate=False)
            await st.pin_policy(pin)
            got = await st.get_policy_pin()
            assert got == VerifyPolicy(max_block_len=3, speculation_gate=False)  # stored without a version
            await st.pin_policy(None)
            assert await st.get_policy_pin() is None
            await st._redis.set(st.keys.policy_pin(), "[1]")
            with pytest.raises(ValueError, match="malformed pinned policy"):
                await st.get_policy_pin()

    run(body())


def test_policy_json_is_validated() -> None:
    p = VerifyPolicy(version=3, max_block_len=5, survival_floor=0.5, budget_mode="production",
               max_batch_size=32, target_tokens_per_s_per_user=60)  # fmt: skip
    assert VerifyPolicy.from_json(p.to_json()) == p
    assert isinstance(VerifyPolicy(target_tokens_per_s_per_user=60).target_tokens_per_s_per_user, float)
    assert VerifyPolicy.from_json('{"max_block_len": 3, "added_later": true}') == VerifyPolicy(max_block_len=3)
    for bad in (
        '{"budget_mode": "yolo"}',
        '{"max_block_len": 0}',
        '{"max_block_len": 2.5}',
        '{"max_block_len": true}',
        '{"survival_floor": 1.5}',
        '{"survival_floor": "0.5"}',
        '{"target_tokens_per_s_per_user": Infinity}',
        '{"version": -1}',
        '{"speculation_gate": "no"}',
        '{"speculation_gate": 0}',
        '"policy"',
        "cos\nsystem\n(S'echo'\ntR.",  # a pickle is just invalid JSON here
    ):
        with pytest.raises(ValueError):
            VerifyPolicy.from_json(bad)


# ------------------------------------------------------------------ outages


def test_redis_outage_is_reported_fast_and_recovers(private_redis_server, redis_prefix) -> None:
    server = private_redis_server

    async def expect_unavailable(call):
        start = time.monotonic()
        with pytest.raises(RedisUnavailable):
            await call
        assert time.monotonic() - start < 2.0  # refused or timed out, never hangs

    async def body():
        cfg = dict(socket_timeout_s=0.3, connect_timeout_s=0.3)
        async with make_state(server, redis_prefix, **cfg) as state, make_state(
            server, redis_prefix, **cfg
        ) as scheduler, PolicySubscription(state, "vg0") as sub:
            follower = PolicyFollower(state, "vg0")
            assert follower.current == VerifyPolicy()  # safe default before anything is published
            await scheduler.publish_policy("vg0", VerifyPolicy(max_block_len=4))
            await scheduler.publish_policy("vg0", VerifyPolicy(max_block_len=5))
            assert (await follower.refresh()).version == 2 and not follower.stale
            assert [await sub.get(timeout_s=2), await sub.get(timeout_s=2)] == [1, 2]
            await state.heartbeat("verifier", "vg0")
            assert state.connected

            server.kill()
            await expect_unavailable(state.heartbeat("verifier", "vg0"))
            assert not state.connected
            await expect_unavailable(state.alive("verifier"))
            await expect_unavailable(state.put_demand("vg0", Demand(active_requests=1)))
            await expect_unavailable(state.get_policy("vg0"))
            await expect_unavailable(state.record_arrivals())
            await expect_unavailable(scheduler.publish_policy("vg0", VerifyPolicy(max_block_len=6)))
            await expect_unavailable(sub.get(timeout_s=1))
            assert await state.ping() is False
            kept = await follower.refresh()  # keeps serving with the last policy
            assert kept.version == 2 and kept.max_block_len == 5 and follower.stale

            server.restart()  # same port, empty data set
            await state.heartbeat("verifier", "vg0")
            assert state.connected and await state.ping()
            assert set(await state.alive("verifier")) == {"vg0"}
            # The subscription re-subscribes by itself on its next read.
            assert await sub.get(timeout_s=0.2) is None
            # The scheduler's versions keep increasing although Redis lost its counter.
            p = await scheduler.publish_policy("vg0", VerifyPolicy(max_block_len=6))
            assert p.version == 3
            assert await sub.get(timeout_s=2) == 3
            now = await follower.refresh()
            assert not follower.stale and now == p

    run(body())


def test_policy_follower_adopts_versions_after_a_full_reset(private_redis_server, redis_prefix) -> None:
    server = private_redis_server

    async def body():
        async with make_state(server, redis_prefix) as state:
            follower = PolicyFollower(state, "vg0")
            for n in (2, 3, 4):
                await make_and_publish(server, redis_prefix, VerifyPolicy(max_block_len=n))
            assert (await follower.refresh()).version == 3
            server.restart()  # Redis and scheduler both start over: version 1 again
            p = await make_and_publish(server, redis_prefix, VerifyPolicy(max_block_len=9))
            assert p.version == 1
            assert await follower.refresh() == p

    async def make_and_publish(server, prefix, policy):
        async with make_state(server, prefix) as scheduler:
            return await scheduler.publish_policy("vg0", policy)

    run(body())


def test_keys_live_under_the_prefix() -> None:
    keys = Keys("px")
    names = [
        keys.heartbeat("verifier", "m"), keys.members("verifier"), keys.demand("g"), keys.demand_groups(),
        keys.arrivals_bucket(5), keys.arrivals_total(), keys.policy_version("g"),
        keys.policy("g"), keys.policy_channel("g"),
    ]  # fmt: skip
    assert all(n.startswith("px:") for n in names) and len(set(names)) == len(names)
    with pytest.raises(ValueError):
        StateConfig(prefix="")


def test_policy_cli_pins_shows_and_lifts_with_one_line_errors(redis_server, redis_prefix) -> None:
    import json

    from click.testing import CliRunner

    from dspark.cli import main

    cli = CliRunner()
    where = ["--redis-url", redis_server.url, "--redis-prefix", redis_prefix]

    def call(*args):
        return cli.invoke(main, ["policy", *args], catch_exceptions=False)

    out = call("pin", *where, "--depth", "4", "--no-gate")
    assert out.exit_code == 0 and "published" not in out.output, out.output
    shown = json.loads(call("show", *where).output)
    assert shown["pinned"]["max_block_len"] == 4 and shown["pinned"]["speculation_gate"] is False
    assert shown["pinned"]["budget_mode"] == "fixed" and shown["published"] == {}
    # --wait with no live verifier group returns at once and says so.
    assert "no verifier group is alive" in call("unpin", *where, "--wait", "5").output
    assert json.loads(call("show", *where).output)["pinned"] is None
    bad = [
        (["pin", *where, "--depth", "0"], 2, "--depth"),
        (["pin", *where, "--depth", "3", "--budget", "yolo"], 2, "--budget"),
        (["pin", *where, "--depth", "3", "--survival-floor", "1.5"], 2, "--survival-floor"),
        (["show", "--redis-url", "redis://127.0.0.1:1/0"], 1, "redis unreachable"),
        (["show", "--redis-url", "nonsense://x"], 1, "Redis URL"),
        (["show", *where[2:]], 2, "no Redis"),
    ]
    env = {"DSPARK_REDIS_URL": ""}
    for args, code, words in bad:
        out = cli.invoke(main, ["policy", *args], env=env)
        assert out.exit_code == code and words in out.output, (args, out.output)
        assert "Traceback" not in out.output and isinstance(out.exception, (SystemExit, type(None))), out.exception
    run(_set_raw(redis_server, redis_prefix, '{"max_block_len": 0}'))
    out = cli.invoke(main, ["policy", "show", *where])
    assert out.exit_code == 1 and "malformed pinned policy" in out.output, out.output


async def _set_raw(server, prefix: str, text: str) -> None:
    async with make_state(server, prefix) as st:
        await st._redis.set(st.keys.policy_pin(), text)
