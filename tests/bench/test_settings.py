"""`bench settings`' summary: rounds kept side by side, ratios taken within a round, then averaged;
and its refusals of bad options (one-line usage errors, before any cluster starts)."""

import pytest
from click.testing import CliRunner

import bench.settings as settings


def _cluster(per_user: float, agg: float) -> dict:
    return {"plain": {"1": {"per_user_tokens_per_s": per_user, "aggregate_tokens_per_s": agg}}}


def test_ratios_are_taken_within_each_round():
    # Round 2 ran on a host twice as fast: a ratio of means (45 / 22.5 = 2.0) would hide that
    # the second value was 1.5x ahead in round 1 and 1.25x in round 2 (mean 1.375).
    rounds = [{"2": _cluster(10.0, 10.0), "1": _cluster(15.0, 15.0)},
              {"2": _cluster(20.0, 40.0), "1": _cluster(25.0, 50.0)}]
    results, rows = settings.summarize([1], [2, 1], rounds, ("plain",))
    one = results["plain"]["1"]["1"]
    assert one["per_user_tokens_per_s"] == [15.0, 25.0] and one["aggregate_tokens_per_s"] == [15.0, 50.0]
    assert abs(one["per_user_vs_first"] - 1.375) < 1e-9 and abs(one["aggregate_vs_first"] - 1.375) < 1e-9
    assert results["plain"]["1"]["2"]["aggregate_vs_first"] == 1.0
    assert [r["value"] for r in rows] == ["2", "1"] and rows[1]["per_user_tok_s"] == "15.0 / 25.0"


@pytest.mark.parametrize("argv, message", [
    (["--values", "two"], "integers separated by commas"),
    (["--concurrency", "0"], "positive integers"),
    (["--rounds", "0"], "Invalid value for '--rounds'"),
    (["--setting", "dtype", "--values", "1"], "integer ClusterConfig field"),
    (["--setting", "nope"], "integer ClusterConfig field"),
    (["--values", "-1"], "torch_threads >= 0"),  # the configuration's own check, named
    (["--setting", "weights", "--values", "dense,q3"], "weights must be dense or q4"),
])
def test_bad_options_are_one_line_usage_errors(argv, message):
    r = CliRunner().invoke(settings.main, argv)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_the_setting_reaches_the_cluster_configuration():
    cfg = settings._config("ngram", False, "local_draft_below", 0)
    assert (cfg["local_draft_below"], cfg["draft"], cfg["draft_workers"]) == (0, "ngram", 1)
    assert settings._config("none", True, "torch_threads", 2)["draft_workers"] == 0
    assert settings._config("hybrid", True, "weights", "q4")["weights"] == "q4"
