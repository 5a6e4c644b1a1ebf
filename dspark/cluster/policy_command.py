"""`dspark policy`: pin one verification policy for every verifier group of a running cluster,
lift the pin, or show what is pinned and published.

The global scheduler publishes a pinned policy instead of the one demand calls for, at its next
round (``scheduler.GlobalScheduler.tick``); verifier groups adopt it when they next poll their
policy's version.  Uses: holding a cluster at a known depth while an incident is looked at, and
comparing verification policies on one cluster in alternating slices (``bench load
--interleave``).  A pin has no expiry: lift it with ``dspark policy unpin``.

    dspark policy pin --redis-url redis://127.0.0.1:6379/0 --depth 4 --budget fixed --no-gate
    dspark policy show --redis-url redis://127.0.0.1:6379/0
    dspark policy unpin --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import click

from dspark.workers.scheduling import BUDGET_MODES, VerifyPolicy


def _redis_options(f):
    f = click.option("--redis-prefix", default="dspark", show_default=True, help="the cluster's key prefix")(f)
    return click.option("--redis-url", default=None,
                        help="the cluster's Redis (default: $DSPARK_REDIS_URL)")(f)  # fmt: skip


def _run(redis_url: str | None, prefix: str, body) -> object:
    """``body(state)`` against the cluster's Redis; a one-line error when it cannot be reached."""
    from dspark.cluster.redis_keys import check_name
    from dspark.cluster.redis_state import RedisState, RedisUnavailable, StateConfig

    url = redis_url or os.environ.get("DSPARK_REDIS_URL")
    if not url:
        raise click.UsageError("no Redis: pass --redis-url or set $DSPARK_REDIS_URL")
    try:
        check_name("prefix", prefix)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--redis-prefix") from None

    async def go():
        async with RedisState(StateConfig(url=url, prefix=prefix)) as state:
            return await body(state)

    try:
        return asyncio.run(go())
    except RedisUnavailable as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # a malformed URL, or a malformed policy stored by someone else
        raise click.ClickException(str(e)) from None


async def pin_and_wait(state, pin: VerifyPolicy | None, timeout_s: float = 30.0) -> dict[str, int]:
    """Pin ``pin`` (None: lift the pin) and wait until the scheduler has published, for every live
    verifier group, the pin or (after a lift) a policy of its own.  Returns each group's version
    then; the groups adopt it when they next poll (every 0.25 s).  Pinning what is pinned already
    changes nothing and waits only for a publication still to come."""
    from dspark.cluster.scheduler import same_policy

    old = await state.get_policy_pin()
    groups = sorted(await state.alive("verifier"))
    before = {g: await state.get_policy_version(g) for g in groups}
    if pin is None and old is None:  # nothing pinned: what is published is the scheduler's own
        return before
    # After a lift, the scheduler's own policy: anything but the old pin.
    wanted = (lambda got: not same_policy(got, old)) if pin is None else (lambda got: same_policy(got, pin))
    if old != pin:
        await state.pin_policy(pin)
    deadline = time.monotonic() + timeout_s
    out = {}
    for g in groups:
        while True:
            got = await state.get_policy(g)
            if got is not None and (old == pin or got.version > before[g]) and wanted(got):
                out[g] = got.version
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no scheduler published the new policy for group {g} within {timeout_s:g} s")
            await asyncio.sleep(0.05)
    return out


def _wait_option(f):
    return click.option("--wait", "wait_s", type=click.FloatRange(0), default=0.0, show_default=True,
                        help="seconds to wait for the scheduler to publish the change to every live "
                             "verifier group (0: do not wait)")(f)  # fmt: skip


def _change(redis_url, redis_prefix, pin: VerifyPolicy | None, wait_s: float) -> dict[str, int] | None:
    async def body(state):
        if wait_s:
            return await pin_and_wait(state, pin, wait_s)
        await state.pin_policy(pin)
        return None

    try:
        return _run(redis_url, redis_prefix, body)
    except TimeoutError as e:
        raise click.ClickException(str(e)) from None


@click.group()
def policy() -> None:
    """Pin, lift or show the verification policy of a running cluster's verifier groups."""


@policy.command()
@_redis_options
@click.option("--depth", type=click.IntRange(1, 64), required=True, help="most draft tokens verified per block")
@click.option("--budget", type=click.Choice(BUDGET_MODES), default="fixed", show_default=True,
              help="fixed: whole blocks; algorithm1 / production: the verifiers' cost-aware budget")
@click.option("--survival-floor", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="drafts whose survival falls below this are never verified")
@click.option("--max-batch", type=click.IntRange(1), default=VerifyPolicy.max_batch_size, show_default=True,
              help="most requests in one verification step (capped by each group's slots)")
@click.option("--gate/--no-gate", default=True, show_default=True,
              help="whether adaptive verifiers may still choose plain steps by measured throughput")
@_wait_option
def pin(redis_url, redis_prefix, depth, budget, survival_floor, max_batch, gate, wait_s) -> None:
    """Pin a verification policy for every verifier group (until `dspark policy unpin`)."""
    p = VerifyPolicy(max_block_len=depth, survival_floor=survival_floor, budget_mode=budget,
                     max_batch_size=max_batch, speculation_gate=gate)  # fmt: skip
    versions = _change(redis_url, redis_prefix, p, wait_s)
    shown = json.dumps({k: v for k, v in p.to_dict().items() if k != "version"}, sort_keys=True)
    click.echo(f"pinned: {shown}; " + _published(versions))


@policy.command()
@_redis_options
@_wait_option
def unpin(redis_url, redis_prefix, wait_s) -> None:
    """Lift the pin: the scheduler goes back to the policy demand calls for."""
    click.echo("unpinned; " + _published(_change(redis_url, redis_prefix, None, wait_s)))


def _published(versions: dict[str, int] | None) -> str:
    if versions is None:
        return "the scheduler publishes the change at its next round"
    if not versions:
        return "no verifier group is alive"
    return "published: " + ", ".join(f"{g} v{v}" for g, v in versions.items())


@policy.command()
@_redis_options
def show(redis_url, redis_prefix) -> None:
    """The pinned policy (if any) and the policy published for each live verifier group, as JSON."""

    async def body(state):
        pinned = await state.get_policy_pin()
        groups = sorted(await state.alive("verifier"))
        published = {g: await state.get_policy(g) for g in groups}
        return pinned, published

    pinned, published = _run(redis_url, redis_prefix, body)
    click.echo(json.dumps({"pinned": pinned.to_dict() if pinned else None,
                           "published": {g: p.to_dict() if p else None for g, p in published.items()}},
                          indent=2, sort_keys=True))  # fmt: skip
