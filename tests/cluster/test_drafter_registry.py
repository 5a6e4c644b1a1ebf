"""The drafter registry is the one list of drafter kinds: the CLI, the cluster config, the
factory and the draft worker read it, and it refuses unknown options and bad values in one line."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from dspark.cli import generate, main
from dspark.cluster.config import ClusterConfig
from dspark.cluster.commands import serve
from dspark.workers.drafters import registry
from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams
from dspark.workers.runner import RunnerConfig


def _choices(command: click.Command, name: str) -> tuple[str, ...]:
    (param,) = [p for p in command.params if p.name == name]
    return tuple(param.type.choices)


def test_cli_choices_are_the_registry():
    assert registry.choices() == ("none", *registry.names())
    assert _choices(generate, "draft") == registry.choices()
    assert _choices(serve, "draft") == registry.choices()


@pytest.mark.parametrize("name", registry.names())
def test_each_module_declares_the_kind_it_is_registered_as(name):
    kind = registry.get(name)
    assert kind.name == name and kind.doc
    assert len({o.name for o in kind.options}) == len(kind.options)
    assert all(o.doc for o in kind.options)


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.names())
def test_every_kind_builds_through_the_factory_with_default_options(name):
    if name in ("dflash", "eagle3"):  # none ships with the engine (tests/models/test_drafter_formats.py, test_eagle3.py)
        with pytest.raises(ValueError, match="head=PATH"):
            build_engine(EngineSpec(dtype="fp32", draft=name, runner=RunnerConfig(n_slots=2, max_seq=256)), progress=False)
        return
    if name in ("mtp", "v4-dspark"):  # the default target is no DeepSeek-V4 (built in tests/models/test_deepseek_v4_mtp.py,
        # test_deepseek_v4_dspark.py)
        with pytest.raises(ValueError, match="needs a DeepSeek-V4 target"):
            build_engine(EngineSpec(dtype="fp32", draft=name, runner=RunnerConfig(n_slots=2, max_seq=256)), progress=False)
        return
    built = build_engine(EngineSpec(dtype="fp32", draft=name, block_len=3, runner=RunnerConfig(n_slots=2, max_seq=256)),
                         progress=False)
    try:
        assert built.engine.drafter is not None
        ids = built.loaded.tokenizer.encode_chat([{"role": "user", "content": "Count to five."}])
        (seq,) = built.engine.generate([ids], SamplingParams(max_tokens=6))
        assert len(seq.output_ids) == 6
    finally:
        built.close()


def test_cluster_config_knows_which_kinds_run_remotely():
    for name in registry.names():
        cfg = ClusterConfig.from_args({"draft": name, "draft_workers": 1})
        assert cfg.remote_draft == registry.get(name).remote
    assert not ClusterConfig.from_args({"draft": "none"}).remote_draft


def test_options_are_parsed_with_defaults():
    assert registry.parse_options("ngram", {"max_ngram": "3"}) == {"max_ngram": 3, "min_ngram": 1}
    opts = registry.parse_options("dspark", (("markov", "0"), ("draft_vocab", 4096)))
    assert opts["markov"] is False and opts["draft_vocab"] == 4096 and opts["proposal_top_k"] == 8


@pytest.mark.parametrize("where", ["factory", "cluster"])
def test_unknown_option_is_refused_in_one_line_naming_it(where):
    with pytest.raises(ValueError) as err:
        if where == "factory":
            build_engine(EngineSpec(dtype="fp32", draft="ngram", draft_options=(("max_gram", 3),)), progress=False)
        else:
            ClusterConfig.from_args({"draft": "layerskip", "draft_options": {"head": "x.safetensors"}})
    msg = str(err.value)
    assert "\n" not in msg and ("'max_gram'" in msg or "'head'" in msg) and "has no option" in msg


@pytest.mark.parametrize("name,key,value,expect", [
    ("ngram", "max_ngram", "abc", "max_ngram must be an integer >= 1"),
    ("layerskip", "layers", 0, "layers must be an integer >= 1"),
    ("draft_model", "draft_layers", 2.5, "draft_layers must be an integer >= 0"),
    ("dspark", "proposal_top_k", 0, "proposal_top_k must be an integer >= 1"),
    ("hybrid", "weights", "int4", "weights must be int8 or float"),
])
def test_bad_value_is_refused_in_one_line(name, key, value, expect):
    with pytest.raises(ValueError, match=expect) as err:
        registry.parse_options(name, {key: value})
    assert "\n" not in str(err.value)


def test_unknown_kind_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown drafter 'eagle'; choose from none, ngram"):
        ClusterConfig.from_args({"draft": "eagle"})


def test_generate_refuses_an_unknown_option_before_loading():
    res = CliRunner().invoke(main, ["generate", "hi", "--draft", "ngram", "--draft-option", "max_gram=3", "--dtype", "fp32"])
    assert res.exit_code != 0
    assert "drafter 'ngram' has no option 'max_gram'" in res.output and "Traceback" not in res.output
