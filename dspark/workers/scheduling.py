"""What a verifier group and the global scheduler exchange: the policy in, the demand out.

* :class:`VerifyPolicy`: how much a verifier verifies (max block length, survival floor, budget
  mode, batch cap); the scheduler publishes one per group, the group's ``AdaptiveBudget``
  follows it, and an engine without a scheduler is built with a local one (version 0).
* :class:`Demand`: a verifier's load (requests decoding and queued, tokens per step, step latency,
  acceptance length), from ``VerifierWorker.demand()``; the group reports it, the scheduler reads it.

Defined here, in the workers layer, because the workers make and obey them; the cluster carries
them through Redis and never mirrors them.  Pure data: no Redis, no torch, no I/O.  Each is a
frozen dataclass whose constructor validates types and ranges (ValueError otherwise), with
to_json/from_json (JSON only: never pickle or eval).  Parsing ignores unknown keys, so a newer
scheduler can add a field without breaking older verifiers, and fills missing keys with defaults.

    >>> p = VerifyPolicy(max_block_len=4, budget_mode="algorithm1")
    >>> VerifyPolicy.from_json(p.to_json()) == p
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# 'fixed' whole blocks, 'algorithm1' greedy budget (paper §3.2), 'production' async variant (§5.2).
BUDGET_MODES: tuple[str, ...] = ("fixed", "algorithm1", "production")

# ------------------------------------------------------------------ checks


def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(
    name: str, value: Any, minimum: float | None = None, maximum: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _set(obj: object, name: str, value: Any) -> None:
    # Frozen dataclasses: normalise (e.g. int -> float) inside __post_init__.
    object.__setattr__(obj, name, value)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} in JSON")


def _loads_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid {what} JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{what} JSON must be an object, got {type(obj).__name__}")
    return obj


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=False, separators=(",", ":"))


# ------------------------------------------------------------------ Demand


@dataclass(frozen=True)
class Demand:
    """Load of one verifier group, as it reports it every few steps (the scheduler's input)."""

    active_requests: int = 0
    """Requests currently decoding in the group."""
    queued_requests: int = 0
    """Requests admitted to the group but waiting for a batch slot."""
    tokens_per_step: float = 0.0
    """Mean tokens verified per forward pass (whole batch)."""
    step_latency_s: float = 0.0
    """Mean wall time of one verification step, seconds."""
    mean_acceptance_length: float = 0.0
    """Mean tokens emitted per request per step, bonus included."""
    timestamp: float = 0.0
    """Unix time of the measurement; 0 lets the writer stamp it."""

    def __post_init__(self) -> None:
        _check_int("active_requests", self.active_requests, 0)
        _check_int("queued_requests", self.queued_requests, 0)
        for name in ("tokens_per_step", "step_latency_s", "mean_acceptance_length", "timestamp"):
            _set(self, name, _check_float(name, getattr(self, name), 0.0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Demand":
        return cls(**_known(cls, data))

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> "Demand":
        return cls.from_dict(_loads_object(text, "Demand"))

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for a Redis hash (floats as repr: exact round-trip)."""
        return {k: repr(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_fields(cls, fields: Mapping[str | bytes, str | bytes]) -> "Demand":
        """Parse a Redis hash written by to_fields; ValueError on malformed values."""
        # Parse each field as the type of its default (int or float).
        defaults = cls()
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, raw in fields.items():
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            if key not in names:
                continue
            text = raw.decode() if isinstance(raw, bytes) else raw
            try:
                values[key] = type(getattr(defaults, key))(text)
            except ValueError as exc:
                raise ValueError(f"Demand field {key}={text!r} is not a number") from exc
        return cls(**values)


# ------------------------------------------------------------------ VerifyPolicy


@dataclass(frozen=True)
class VerifyPolicy:
    """How much one verifier group verifies, set by the global scheduler.

    The defaults are the safe fallback a verifier uses before any policy was
    published or while Redis is unreachable: verify whole blocks.  An engine
    built without a scheduler gets a local policy (``build_engine``).
    """

    version: int = 0
    """Publication number assigned by Redis (INCR); 0 means never published."""
    max_block_len: int = 7
    """Most draft tokens a verifier asks a drafter for per step (gamma)."""
    survival_floor: float = 0.0
    """Draft tokens whose survival a_{r,j} falls below this are never verified."""
    budget_mode: str = "fixed"
    """'fixed' whole blocks, 'algorithm1' greedy budget (paper §3.2), 'production' async variant (§5.2)."""
    max_batch_size: int = 64
    """Most requests in one verification step."""
    target_tokens_per_s_per_user: float = 0.0
    """Per-user speed the budget should keep (tok/s/user); 0 means no target."""
    speculation_gate: bool = True
    """Whether the verifier's speculation gate may choose plain steps (adaptive verifiers);
    False: every step with a drafter speculates, as under a fixed depth."""

    def __post_init__(self) -> None:
        _check_int("version", self.version, 0)
        _check_int("max_block_len", self.max_block_len, 1)
        _set(self, "survival_floor", _check_float("survival_floor", self.survival_floor, 0.0, 1.0))
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {self.budget_mode!r}")
        _check_int("max_batch_size", self.max_batch_size, 1)
        _set(
            self,
            "target_tokens_per_s_per_user",
            _check_float("target_tokens_per_s_per_user", self.target_tokens_per_s_per_user, 0.0),
        )
        if not isinstance(self.speculation_gate, bool):
            raise ValueError(f"speculation_gate must be a bool, got {self.speculation_gate!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VerifyPolicy":
        return cls(**_known(cls, data))

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> "VerifyPolicy":
        return cls.from_dict(_loads_object(text, "VerifyPolicy"))

    def with_version(self, version: int) -> "VerifyPolicy":
        return dataclasses.replace(self, version=version)


__all__ = ["BUDGET_MODES", "Demand", "VerifyPolicy"]
