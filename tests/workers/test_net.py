"""`free_port`: the ports the cluster and its tests pick for servers they start a moment later
come from outside the ranges the OS and Ray draw from when a process binds port 0, so nothing
that starts in between takes them."""

from __future__ import annotations

import socket

import dspark.net as net
from dspark.net import ephemeral_start, free_port


def test_picked_ports_are_bindable_and_outside_the_ranges_others_draw_from():
    picks = {free_port() for _ in range(20)}
    assert len(picks) > 1  # random, not the module RNG a test may have seeded
    for port in picks:  # below where every bind(0) lands, so nothing started meanwhile takes them
        assert 20_000 <= port < ephemeral_start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped(monkeypatch):
    busy = next(p for p in iter(free_port, None) if _free(p + 1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", busy))
        monkeypatch.setattr(net, "_RAY_WORKER_PORTS_END", busy)  # the window: {busy, busy + 1}
        monkeypatch.setattr(net, "ephemeral_start", lambda: busy + 2)
        assert {free_port() for _ in range(20)} == {busy + 1}


def test_no_window_falls_back_to_the_os_pick(monkeypatch):
    monkeypatch.setattr(net, "ephemeral_start", lambda: 20_000)  # an OS whose ephemeral range starts low
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
