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
