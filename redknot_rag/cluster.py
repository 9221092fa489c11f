"""`redknot cluster up --replicas N`: one machine, the replica topology of deploy/ without containers.

Starts, in order, and waits for each to answer before the next:

1. `redis-server` on loopback (no persistence, `allkeys-lru` under `--redis-maxmemory`): the shared cold
   tier for chunk KV (skipped with `--redis-url`, which points at a Redis already running);
2. N `redknot serve` replicas on consecutive ports, each with `--redis-url` (and every argument after
   `--`, e.g. `--model-path`, `--data-dir`, `--tp`; `{replica}` in them becomes the replica's number);
3. SGLang's router (`python -m sglang_router.launch_router`, PyPI `sglang-router`) over the replicas
   with its cache-aware policy (prompts sharing a prefix go to the same replica).

Then it waits; SIGINT/SIGTERM stops the router, the replicas and Redis, in that order. Every process
writes its log under `--log-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ClusterError(RuntimeError):
    """A piece of the cluster could not start (the message says which, and where its log is)."""


@dataclass(frozen=True)
class ClusterSpec:
    """What `up` starts. Ports: router `port`, replicas `replica_port + i`, Redis `redis_port`."""

    replicas: int = 2
    host: str = "127.0.0.1"
    port: int = 30000
    replica_port: int = 30010
    redis_port: int = 6390
    redis_url: str | None = None  # an existing Redis: no redis-server is started
    redis_maxmemory: str = "2gb"
    policy: str = "cache_aware"
    serve_args: tuple[str, ...] = ()
    # sglang-router 0.3.2 with cache_aware keeps sending a prefix's requests to a dead replica until its
    # health check fails (measured here: the 2 requests after a kill got 500); an open circuit breaker
    # after the first failure makes the router's retry go to a live replica instead.
    router_args: tuple[str, ...] = ("--cb-failure-threshold", "1")
    log_dir: Path = Path("cluster-logs")
    start_timeout_s: float = 300.0

    @property
    def shared_redis_url(self) -> str:
        return self.redis_url or f"redis://{self.host}:{self.redis_port}/0"

    def replica_url(self, i: int) -> str:
        return f"http://{self.host}:{self.replica_port + i}"

    @property
    def router_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Cluster:
    """The running processes of one `ClusterSpec` (a context manager: `down()` on exit)."""

    spec: ClusterSpec
    redis: subprocess.Popen | None = None
    replicas: list[subprocess.Popen] = field(default_factory=list)
    router: subprocess.Popen | None = None

    def up(self) -> Cluster:
        s = self.spec
        if s.replicas < 1:
            raise ClusterError(f"--replicas must be >= 1, got {s.replicas}")
        s.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if s.redis_url is None:
                self._start_redis()
            for i in range(s.replicas):
                self.replicas.append(self._start_replica(i))
            for i, p in enumerate(self.replicas):
                _wait_http(s.replica_url(i) + "/health", p, s.start_timeout_s, s.log_dir / f"replica-{i}.log")
            self._start_router()
        except BaseException:
            self.down()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.spec.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (the child owns it)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _start_redis(self) -> None:
        s = self.spec
        exe = shutil.which("redis-server")
        if exe is None:
            raise ClusterError("redis-server not found: install it (apt-get install redis-server) or pass --redis-url")
        cmd = [exe, "--bind", s.host, "--port", str(s.redis_port), "--save", "", "--appendonly", "no"]
        cmd += ["--maxmemory", s.redis_maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self.redis = self._spawn("redis", cmd)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.redis.poll() is not None:
                raise ClusterError(f"redis-server exited ({self.redis.returncode}); see {s.log_dir / 'redis.log'}")
            with contextlib.suppress(OSError), socket.create_connection((s.host, s.redis_port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.2)
        raise ClusterError(f"redis-server did not answer on {s.host}:{s.redis_port}")

    def _start_replica(self, i: int) -> subprocess.Popen:
        s = self.spec
        cmd = [sys.executable, "-m", "redknot_rag.cli", "serve", "--host", s.host]
        own = [a.replace("{replica}", str(i)) for a in s.serve_args]  # e.g. --data-dir /srv/rk-{replica}
        cmd += ["--port", str(s.replica_port + i), "--redis-url", s.shared_redis_url, *own]
        return self._spawn(f"replica-{i}", cmd, env={**os.environ, "REDKNOT_REDIS_URL": s.shared_redis_url})

    def _start_router(self) -> None:
        s = self.spec
        try:
            import sglang_router  # noqa: F401
        except ImportError as e:
            raise ClusterError("SGLang's router is not installed: pip install sglang-router") from e
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", s.host, "--port", str(s.port)]
        cmd += ["--policy", s.policy, "--worker-urls", *[s.replica_url(i) for i in range(s.replicas)]]
        cmd += ["--log-level", "warn", *s.router_args]
        self.router = self._spawn("router", cmd)
        _wait_http(s.router_url + "/health", self.router, s.start_timeout_s, s.log_dir / "router.log")

    def stop_replica(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill replica `i` (failure drills: the router must route around it)."""
        p = self.replicas[i]
        if p.poll() is None:
            p.send_signal(sig)
            p.wait(timeout=60)

    def down(self) -> None:
        """Stop the router, then the replicas (SIGTERM: they drain), then Redis. Idempotent."""
        for p in [self.router, *self.replicas, self.redis]:
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
            raise ClusterError(f"{url}: process exited ({proc.returncode}); log {log}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise ClusterError(f"{url} did not answer within {timeout:.0f} s; log {log}")


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cluster",
        help="start Redis + N replicas + SGLang's router on this machine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="cluster_cmd", required=True)
    up = sub.add_parser(
        "up",
        help="start and wait (Ctrl-C stops everything); arguments after -- go to every replica's `redknot serve`",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=30000, help="the router's port")
    up.add_argument("--replica-port", type=int, default=30010, help="replica i listens on this + i")
    up.add_argument("--redis-port", type=int, default=6390)
    up.add_argument("--redis-url", default=None, help="use this Redis instead of starting redis-server")
    up.add_argument("--redis-maxmemory", default="2gb")
    up.add_argument("--policy", default="cache_aware", help="router policy: cache_aware, round_robin, ...")
    up.add_argument("--log-dir", type=Path, default=Path("cluster-logs"))
    up.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then `redknot serve` arguments")
    p.set_defaults(func=_cmd_cluster)


def _cmd_cluster(args: argparse.Namespace) -> int:
    rest = list(args.serve_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    spec = ClusterSpec(
        replicas=args.replicas,
        host=args.host,
        port=args.port,
        replica_port=args.replica_port,
        redis_port=args.redis_port,
        redis_url=args.redis_url,
        redis_maxmemory=args.redis_maxmemory,
        policy=args.policy,
        serve_args=tuple(rest),
        log_dir=args.log_dir,
    )
    stop = {"now": False}

    def on_signal(sig: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    with Cluster(spec) as c:
        print(f"router {spec.router_url}  replicas {[spec.replica_url(i) for i in range(spec.replicas)]}  "
              f"redis {spec.shared_redis_url}  logs {spec.log_dir}/", flush=True)  # fmt: skip
        try:
            while not stop["now"]:
                for i, p in enumerate(c.replicas):
                    if p.poll() is not None:
                        print(f"replica {i} exited ({p.returncode}); the router routes around it", flush=True)
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0
