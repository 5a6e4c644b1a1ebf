"""The drafter registry: every drafter kind, its constructor, its options, where it can run.

The CLI's ``--draft`` choices, ``ClusterConfig`` validation, the engine factory and the draft
worker all read this one table; nothing else lists drafter kinds.

Adding a drafter touches one new file plus its registration line:

1. ``dspark/workers/drafters/<name>.py``: the drafter class (the ``Drafter`` protocol of
   ``base.py``) and, at the end, its ``KIND = DrafterKind(...)``: constructor, options (name,
   parser, default, one-line doc), whether it can run on a remote draft worker;
2. one line in ``DRAFTERS`` below: ``"<name>": "dspark.workers.drafters.<name>:KIND"``.

A drafter module is imported on first use, so listing the names (``dspark --help``) loads no
model code.  Options are checked before anything is built: an unknown option or a value its
parser refuses is a one-line ``ValueError`` naming the option.

Example:
    >>> names()[:2]
    ('ngram', 'layerskip')
    >>> parse_options("ngram", {"max_ngram": "3"})
    {'max_ngram': 3, 'min_ngram': 1}
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from dspark.models.config import ModelArgs
    from dspark.models.loader import LoadedModel
    from dspark.workers.drafters.base import Drafter
    from dspark.workers.runner import RunnerConfig

# name -> "module:attribute" of its DrafterKind; "none" (no drafter) is not a kind.
DRAFTERS: dict[str, str] = {
    "ngram": "dspark.workers.drafters.ngram:KIND",
    "layerskip": "dspark.workers.drafters.autoregressive:LAYERSKIP",
    "draft_model": "dspark.workers.drafters.autoregressive:DRAFT_MODEL",
    "dspark": "dspark.workers.drafters.dspark:KIND",
    "dflash": "dspark.workers.drafters.dflash:KIND",
    "eagle3": "dspark.workers.drafters.eagle3:KIND",
    "hybrid": "dspark.workers.drafters.hybrid:KIND",
    "mtp": "dspark.workers.drafters.mtp:KIND",
    "v4-dspark": "dspark.workers.drafters.v4_dspark:KIND",
}


@dataclass(frozen=True)
class DraftOption:
    """One ``--draft-option KEY=VALUE`` setting of a drafter kind."""

    name: str
    parse: Callable[[Any], Any]  # raw value (CLI number or string, YAML value) -> typed value; ValueError(expectation)
    default: Any = None  # used when the option is not given (None: the constructor derives it, see doc)
    doc: str = ""  # one line


@dataclass(frozen=True)
class DraftContext:
    """What a drafter's constructor may use of its target and of the process that hosts it."""

    loaded: "LoadedModel | None"  # the whole target (weights, tokenizer); None where the host holds no copy
    args: "ModelArgs | None"  # the target's architecture (None on a draft worker for kinds without weights)
    target_runner: Any  # the target's runner; None on a draft worker (no target KV cache there)
    runner: "RunnerConfig"  # sizing of the drafter's own cache: requests held at once, longest request
    model: str | None = None  # target checkpoint (None: the embedded default)
    dtype: str = "bf16"
    device: Any = "cpu"  # where the drafter runs (the target runner's device when there is one)
    name: str = ""  # the target's short name (which shipped head belongs to it)


@dataclass(frozen=True)
class DrafterKind:
    """A registered drafter kind."""

    name: str
    build: Callable[[DraftContext, dict], "Drafter"]  # (context, parsed options with defaults) -> drafter
    doc: str  # one line
    options: tuple[DraftOption, ...] = ()
    remote: bool = False  # can run on a remote draft worker (needs neither the target's runner nor its cache)
    needs_weights: bool = False  # reads the target's weights (a draft worker loads the target for it)
    # With a tensor-parallel target: builds from rank 0's shard of it (reading whatever else it needs
    # from the checkpoint itself), so no whole copy of the target is loaded beside the group.
    takes_target_shard: bool = False
    # Target layers whose features observe() must receive, known before the drafter is built
    # (options, target name) -> layers; a verifier announces them to remote workers.
    feature_layers: Callable[[dict, str], tuple[int, ...]] | None = None


def names() -> tuple[str, ...]:
    """Every registered kind, in registration order."""
    return tuple(DRAFTERS)


def choices() -> tuple[str, ...]:
    """What ``--draft`` accepts: ``none`` (plain decoding) and every kind."""
    return ("none", *DRAFTERS)


_loaded: dict[str, DrafterKind] = {}


def get(name: str) -> DrafterKind:
    """The kind called ``name``; an unknown name is a one-line error listing the choices."""
    kind = _loaded.get(name)
    if kind is None:
        target = DRAFTERS.get(name)
        if target is None:
            raise ValueError(f"unknown drafter {name!r}; choose from {', '.join(choices())}")
        module, attr = target.split(":")
        kind = _loaded[name] = getattr(importlib.import_module(module), attr)
        if kind.name != name:
            raise RuntimeError(f"{target} declares drafter {kind.name!r}, registered as {name!r}")
    return kind


def parse_options(name: str, raw: Mapping[str, Any] | tuple = ()) -> dict[str, Any]:
    """``raw`` options of drafter ``name``, parsed, with every default filled in.

    Refuses an option the kind does not have and a value its parser refuses, naming the option.
    """
    kind = get(name)
    given = dict(raw)
    known = {o.name: o for o in kind.options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        have = ", ".join(known) or "none"
        raise ValueError(f"drafter {name!r} has no option {unknown[0]!r} (its options: {have})")
    out = {}
    for key, opt in known.items():
        if key not in given:
            out[key] = opt.default
            continue
        try:
            out[key] = opt.parse(given[key])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"drafter option {key} must be {exc} (got {given[key]!r})") from None
    return out


def build_drafter(name: str, ctx: DraftContext, raw: Mapping[str, Any] | tuple = ()) -> "Drafter":
    """Build drafter ``name`` for the target in ``ctx`` from its ``raw`` options."""
    return get(name).build(ctx, parse_options(name, raw))


def feature_layers(name: str, raw: Mapping[str, Any] | tuple, target_name: str) -> tuple[int, ...]:
    """Target layers drafter ``name`` needs, without building it (() for kinds without features)."""
    kind = get(name)
    return kind.feature_layers(parse_options(name, raw), target_name) if kind.feature_layers else ()


def assignments(items) -> tuple[tuple[str, Any], ...]:
    """``KEY=VALUE`` strings (``--draft-option``) as (key, value) pairs; numbers become int / float.

    Example:
        >>> assignments(["head=/m/h", "proposal_top_k=4"])
        (('head', '/m/h'), ('proposal_top_k', 4))
    """
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        val: Any = raw
        for kind in (int, float):
            try:
                val = kind(raw)
                break
            except ValueError:
                pass
        out.append((key.strip(), val))
    return tuple(out)


# -- option parsers: raw value -> typed value, or ValueError naming what was expected ------------
def integer(minimum: int | None = None) -> Callable[[Any], int]:
    """An integer (``4``, ``"4"``, ``4.0``), at least ``minimum`` when given."""
    what = "an integer" if minimum is None else f"an integer >= {minimum}"

    def parse(raw: Any) -> int:
        try:
            k = int(raw)
        except (TypeError, ValueError):
            raise ValueError(what) from None
        if isinstance(raw, bool) or str(raw).strip() not in (str(k), f"{k}.0") or (minimum is not None and k < minimum):
            raise ValueError(what)
        return k

    return parse


def optional_integer(minimum: int | None = None) -> Callable[[Any], int | None]:
    """Like ``integer``; an empty string means "not set" (None)."""
    inner = integer(minimum)
    return lambda raw: None if raw is None or (isinstance(raw, str) and not raw.strip()) else inner(raw)


def flag(raw: Any) -> bool:
    """A switch: 1/0, true/false, yes/no, on/off (an empty string is off)."""
    if isinstance(raw, str):
        return raw.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(raw)


def text(raw: Any) -> str | None:
    """A string such as a path; an empty string means "not set" (None)."""
    if raw is None:
        return None
    if not isinstance(raw, (str, os.PathLike)):
        raise ValueError("a string")
    return str(raw) or None


def proposal_top_k_option() -> DraftOption:
    """The ``proposal_top_k`` option shared by the sampling drafters (see ``base.proposal_top_k``)."""
    return DraftOption("proposal_top_k", integer(1), 8, "proposal entries sent per draft token (sparse q)")


__all__ = [
    "DRAFTERS", "DraftContext", "DraftOption", "DrafterKind", "assignments", "build_drafter", "choices", "feature_layers", "flag",
    "get", "integer", "names", "optional_integer", "parse_options", "proposal_top_k_option", "text",
]
