"""Ports for servers this process (or one it starts) will bind a moment later.

A port found by binding port 0 comes from the OS's ephemeral range, the range every
outgoing connection and every later ``bind(0)`` also draws from; Ray draws its own
random ports above it.  Between the pick and the server's bind (seconds while Ray
starts), such a port is often taken.  :func:`free_port` picks instead, at random, a
port below the ephemeral range and above Ray's default worker ports (10002-19999),
which only an explicit bind can take.
"""

from __future__ import annotations

import random
import socket

_RAY_WORKER_PORTS_END = 20_000  # Ray's default worker ports end just below
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_TRIES = 64


def ephemeral_start() -> int:
    """First port of the OS's ephemeral range (Linux reads it; elsewhere the IANA range's start)."""
    try:
        with open(_EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49_152


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now and outside the ranges other processes pick from on their
    own; the OS's pick (port 0) when that window is empty or full."""
    lo, hi = _RAY_WORKER_PORTS_END, ephemeral_start() - 1
    pick = random.SystemRandom()  # not the seeded module RNG: parallel test workers must differ
    for _ in range(_TRIES if hi > lo else 0):
        port = pick.randint(lo, hi)
        if _bindable(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
