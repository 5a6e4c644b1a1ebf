"""The layout of the cluster state in Redis: every key and channel name, and the one script.

All names live under a configurable prefix P (default "dspark"):

    P:hb:<role>:<member>         string  JSON info of a live member; expires after its TTL
    P:members:<role>             set     members that ever heartbeated (expired ones pruned on read)
    P:demand:<group>             hash    Demand fields of a verifier group; expires (demand_ttl_s)
    P:demand_groups              set     groups that reported demand (pruned on read)
    P:arrivals:<unix_second>     string  requests that reached a router in that second; expires
    P:arrivals_total             string  requests that reached a router, ever
    P:policy_version:<group>     string  policy version counter (INCR)
    P:policy:<group>             hash    {version, policy (JSON without version), published_at}
    P:policy_updates:<group>     channel pub/sub poke; the message is the new version number
    P:policy_pin                 string  JSON policy (without version) an operator pinned for
                                         every group; absent: the scheduler computes them

Who writes what: every role heartbeats; routers count arrivals; verifier groups store their
demand; the scheduler publishes policies (version, hash and poke in one script); an operator
(`dspark policy pin`, `bench load --interleave`) may pin one policy, which the scheduler then
publishes for every group instead of the one demand calls for. Readers:
the scheduler reads verifiers' heartbeats, all demand and the arrival rate; verifier groups
read drafters' heartbeats (their draft workers' addresses) and poll their policy's version.
Nothing in dspark reads routers' or the scheduler's heartbeats, arrivals_total or the
policy channel: they are for operators and tests (the pokes are hints; verifier groups poll).

Roles are "router", "verifier", "drafter" and "scheduler". The operations on these keys are
:class:`~dspark.cluster.redis_state.RedisState`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES: tuple[str, ...] = ("router", "verifier", "drafter", "scheduler")

__all__ = ["PUBLISH_POLICY_LUA", "ROLES", "Keys", "check_name", "check_role"]


def check_name(kind: str, value: str) -> str:
    """``value`` if it may be part of a key name (printable, no whitespace, 1-200 characters).

    >>> check_name("group", "vg0")
    'vg0'
    """
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ValueError(f"{kind} must be a non-empty string of at most 200 characters, got {value!r}")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{kind} must not contain whitespace or control characters: {value!r}")
    return value


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`ROLES`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


@dataclass(frozen=True)
class Keys:
    """Every Redis key and channel name used by dspark (see the module doc)."""

    prefix: str = "dspark"

    def heartbeat(self, role: str, member: str) -> str:
        return f"{self.prefix}:hb:{role}:{member}"

    def members(self, role: str) -> str:
        return f"{self.prefix}:members:{role}"

    def demand(self, group: str) -> str:
        return f"{self.prefix}:demand:{group}"

    def demand_groups(self) -> str:
        return f"{self.prefix}:demand_groups"

    def arrivals_bucket(self, unix_second: int) -> str:
        return f"{self.prefix}:arrivals:{unix_second}"

    def arrivals_total(self) -> str:
        return f"{self.prefix}:arrivals_total"

    def policy_version(self, group: str) -> str:
        return f"{self.prefix}:policy_version:{group}"

    def policy(self, group: str) -> str:
        return f"{self.prefix}:policy:{group}"

    def policy_channel(self, group: str) -> str:
        return f"{self.prefix}:policy_updates:{group}"

    def policy_pin(self) -> str:
        return f"{self.prefix}:policy_pin"


# Publishing a policy, atomically: INCR the version (never below the publisher's last
# version, so a Redis that lost its data does not hand out old numbers again), store the
# policy and poke subscribers.
#   KEYS: [policy_version(group), policy(group)]
#   ARGV: [policy JSON without version, publisher's last version, published_at, policy_channel(group)]
#   returns the new version
PUBLISH_POLICY_LUA = """
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[2])
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
redis.call('HSET', KEYS[2], 'version', v, 'policy', ARGV[1], 'published_at', ARGV[3])
redis.call('PUBLISH', ARGV[4], v)
return v
"""
