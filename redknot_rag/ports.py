"""Free local TCP ports for servers this process starts (replicas, routers, Redis, TP rendezvous, tests)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """`n` distinct ports on 127.0.0.1 that were free a moment ago: all are bound at once (so none repeats),
    then released for the caller's servers to bind."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
