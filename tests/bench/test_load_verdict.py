"""`bench load`'s summary: rounds combined, adaptive against the best of plain and fixed depths."""

import doctest

import bench.load as load


def _row(config, level, agg, user, rnd=1, requests=4):
    return {"config": config, "loop": "closed", "level": level, "round": rnd, "requests": requests, "errors": 0,
            "aggregate_tok_s": agg, "per_user_tok_s": user, "acceptance_length": None}


def test_rounds_are_averaged_and_counted():
    raw = [_row("fixed2", 1, 20.0, 20.0, 1), _row("fixed2", 1, 30.0, 24.0, 2, requests=6),
           _row("adaptive", 1, 27.0, 22.0, 1)]
    rows = load.combine_rounds(raw)
    fixed = next(r for r in rows if r["config"] == "fixed2")
    assert (fixed["aggregate_tok_s"], fixed["per_user_tok_s"], fixed["requests"], fixed["rounds"]) == (25.0, 22.0, 10, 2)
    assert fixed["acceptance_length"] is None and "round" not in fixed
    assert doctest.testmod(load).failed == 0


def test_a_level_reports_its_median_time_to_first_token():
    def req(ttft):
        return {"tokens": 4, "seconds": 1.0, "ttft": ttft, "itl": [0.1, 0.1, 0.1], "finish": "length", "spec": {}}

    got = load._summarise([req(0.3), req(0.1), req(None), req(0.2), {"error": 500}], wall=2.0)
    assert got["ttft_p50_ms"] == 200.0 and got["requests"] == 4 and got["errors"] == 1  # no first token: left out
    assert load._summarise([req(None)], wall=1.0)["ttft_p50_ms"] is None


def test_plain_counts_among_the_others():
    """At high load plain decoding is often the best configuration: adaptive is judged against it
    too, and per user against the best per-user figure, which may be another configuration."""
    rows = load.combine_rounds([_row("fixed2", 16, 80.0, 5.0), _row("fixed7", 16, 60.0, 5.5),
                                _row("plain", 16, 100.0, 6.0), _row("adaptive", 16, 90.0, 6.3)])
    (line,) = load.verdict(rows, [16])
    assert "aggregate = 0.90x the best of the others (plain)" in line
    assert "per user = 1.05x (plain)" in line
    assert "aggregate vs plain = 0.90x" in line
    rows = load.combine_rounds([_row("fixed7", 1, 30.0, 30.0), _row("plain", 1, 20.0, 20.0),
                                _row("adaptive", 1, 31.5, 29.0)])
    (line,) = load.verdict(rows, [1])
    assert "1.05x the best of the others (fixed7)" in line and "per user = 0.97x (fixed7)" in line


def test_interleaved_configurations_pin_what_separate_clusters_ran():
    """--interleave: fixed depths and plain are pinned fixed-depth policies with the speculation
    gate off (plain: the deepest depth, requests not speculative); adaptive lifts the pin.  Open
    loops are refused in one line (the slices compare closed-loop levels)."""
    from click.testing import CliRunner

    pins = load._pins([2, 4, 7])
    assert list(pins) == ["fixed2", "fixed4", "fixed7", "plain", "adaptive"]
    for name, depth in (("fixed2", 2), ("fixed4", 4), ("fixed7", 7), ("plain", 7)):
        pin, speculative = pins[name]
        assert (pin.max_block_len, pin.budget_mode, pin.speculation_gate) == (depth, "fixed", False)
        assert speculative == (name != "plain")
    assert pins["adaptive"] == (None, True)
    out = CliRunner().invoke(load.main, ["--interleave", "--rates", "1"])
    assert out.exit_code == 2 and "--rates ''" in out.output and "Traceback" not in out.output


def test_the_aggregate_while_sending_is_judged_against_its_own_best():
    """The steady aggregate (tokens streamed while the clients were sending, without the drain)
    has its own best configuration; rows without it (older JSON) leave it out of the line."""
    raw = [_row("plain", 16, 100.0, 6.0), _row("fixed4", 16, 80.0, 5.0), _row("adaptive", 16, 90.0, 6.0)]
    for r, window in zip(raw, (150.0, 160.0, 147.0)):
        r["window_tok_s"] = window
    (line,) = load.verdict(load.combine_rounds(raw), [16])
    assert "aggregate = 0.90x the best of the others (plain)" in line
    assert "aggregate while sending = 0.92x (fixed4)" in line
    for r in raw:
        r["window_tok_s"] = None
    (line,) = load.verdict(load.combine_rounds(raw), [16])
    assert "while sending" not in line


def _slice(config, level, k, agg, user, warmup=False):
    row = {"config": config, "loop": "closed", "level": level, "slice": k, "requests": 4, "errors": 0,
           "aggregate_tok_s": agg, "per_user_tok_s": user}
    return {**row, "warmup": True} if warmup else row


def test_the_spread_over_rounds_picks_the_best_again_in_each_draw():
    """Two others that lead in alternate rounds: in every draw the best of the two reads at least
    their common mean, so the interval lies below 1 although adaptive ties the better one's mean;
    warm-up slices and other levels stay out, and under three rounds there is no interval."""
    rows = []
    for k in range(1, 7):
        a, b = (12.0, 8.0) if k % 2 else (8.0, 12.0)
        rows += [_slice("fixed2", 4, k, a, a), _slice("plain", 4, k, b, b), _slice("adaptive", 4, k, 10.0, 10.0),
                 _slice("adaptive", 4, k + 10, 1.0, 1.0, warmup=True), _slice("adaptive", 16, k, 99.0, 99.0)]
    lo, hi = load.round_spread(rows, 4, "aggregate_tok_s")
    assert 0.7 < lo < hi == 1.0
    assert load.round_spread(rows[:10], 4, "aggregate_tok_s") is None  # two rounds


def test_warmup_slices_are_judged_apart():
    """--warmup-rounds: the warm-up slices are not in the rows the verdict reads; warmup_rows
    combines them per configuration for the line on what adapting cost."""
    raw = [_slice("plain", 1, 1, 10.0, 10.0, True), _slice("adaptive", 1, 1, 8.0, 8.0, True)]
    raw += [_slice(c, 1, k, v, v) for k in (2, 3, 4) for c, v in (("plain", 10.0), ("adaptive", 10.0))]
    rows = load.combine_rounds([r for r in raw if not r.get("warmup")])
    (line,) = load.verdict(rows, [1], raw)
    assert "aggregate = 1.00x the best of the others (plain)" in line
    assert "rounds resampled, 90% of draws: aggregate 1.00x-1.00x, per user 1.00x-1.00x" in line
    (warm,) = load.verdict(load.warmup_rows(raw), [1])
    assert "aggregate = 0.80x the best of the others (plain)" in warm


def test_the_spread_pools_slices_as_the_rows_do():
    """Per user, the rows average over requests: a slice of nine requests weighs nine times one
    of one.  Adaptive alternates 12 tok/s over one request and 8 over nine (8.4 pooled, 0.84x of
    plain's 10); equal weights would centre the interval on 1.0x."""
    rows = []
    for k in range(1, 7):
        user, n = (12.0, 1) if k % 2 else (8.0, 9)
        rows += [{**_slice("plain", 4, k, 10.0, 10.0), "requests": 4},
                 {**_slice("adaptive", 4, k, 10.0, user), "requests": n}]
    lo, hi = load.round_spread(rows, 4, "per_user_tok_s")
    assert 0.8 <= lo < 0.84 < hi < 1.0, (lo, hi)
