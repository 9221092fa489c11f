"""A private redis-server for the store benchmarks: the system's, or the bundle `redis_bundle.sh` builds."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[2] / ".redis"  # <repo>/.redis, see redis_bundle.sh


def redis_command() -> list[str] | None:
    """How to start redis-server here: the system binary, else the bundle through its own loader
    (runs whatever the host's glibc), else None."""
    binary = shutil.which("redis-server")
    if binary is not None:
        return [binary]
    if (BUNDLE / "redis-server").is_file() and (BUNDLE / "ld-linux-x86-64.so.2").is_file():
        return [str(BUNDLE / "ld-linux-x86-64.so.2"), "--library-path", str(BUNDLE), str(BUNDLE / "redis-server")]
    return None


def start_redis(tmp: Path, why: list[str] | None = None) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """A private redis-server on a free port (no persistence): (process, url), or (None, None) if it
    cannot run here; the reason is appended to `why` when given."""
    cmd = redis_command()
    if cmd is None:
        if why is not None:
            why.append(f"no redis-server on PATH and no bundle at {BUNDLE}")
        return None, None
    try:
        import redis
    except ImportError as e:
        if why is not None:
            why.append(f"the redis Python client is missing: {e}")
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)]
    try:
        proc = subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        if why is not None:
            why.append(f"{cmd[0]} did not start: {e}")
        return None, None
    client = redis.Redis(port=port)
    for _ in range(200):
        if proc.poll() is not None:
            break
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    err = proc.communicate()[1].decode(errors="replace").strip()[-500:]
    if why is not None:
        why.append(f"{' '.join(cmd)} did not answer PING (exit {proc.returncode}): {err}")
    return None, None
