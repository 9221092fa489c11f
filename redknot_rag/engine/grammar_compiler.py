"""Grammar compilation in worker processes, each bounded in time and killed when it runs over.

xgrammar's compile is native code that cannot be interrupted: a 150k-way regex or a 30k-item enum
compiled for minutes on a request thread, long after its client left. Here each compile runs in a
worker process (spawned, holding the tokenizer's xgrammar info); the caller waits at most
`timeout_s`, and a worker that runs over is killed, so no abandoned compile keeps burning a core.
A compiled grammar comes back serialized (xgrammar's JSON form) and is kept in a byte-bounded LRU.
"""

from __future__ import annotations

import collections
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection

import xgrammar as xgr

# Whitespace the JSON grammars allow between tokens: one character (space or newline) at each
# place JSON allows any. Unbounded whitespace lets a small model loop on blanks until `length`.
_JSON_MAX_WHITESPACE = 1


_START_S = 120.0  # a worker's start-up (importing xgrammar and torch)


class GrammarCompileError(Exception):
    """xgrammar refused the grammar (its parser's first message line)."""


class GrammarTimeoutError(Exception):
    """Compiling took longer than the pool's `timeout_s` (the worker was killed)."""


def _serve(conn: Connection, info_json: str) -> None:
    """A worker's loop: (kind, source) in, ("ok", serialized) or ("error", message) out; None ends it."""
    info = xgr.TokenizerInfo.deserialize_json(info_json)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    conn.send(("ready", ""))
    while (msg := conn.recv()) is not None:
        kind, source = msg
        try:
            if kind == "regex":
                compiled = compiler.compile_regex(source)
            elif kind == "ebnf":
                compiled = compiler.compile_grammar(source)
            else:
                compiled = compiler.compile_json_schema(
                    source, any_whitespace=True, max_whitespace_cnt=_JSON_MAX_WHITESPACE
                )
            conn.send(("ok", compiled.serialize_json()))
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with a parser message
            text = str(e).strip()
            conn.send(("error", text.splitlines()[0] if text else type(e).__name__))


class _Worker:
    def __init__(self, info_json: str) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs torch threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, info_json), name="redknot-grammar-compile", daemon=True)
        self.proc.start()
        child.close()

    def wait_ready(self) -> None:
        """Wait for the worker to load xgrammar (seconds on a busy machine: not counted as compile time)."""
        if not self.conn.poll(_START_S) or self.conn.recv()[0] != "ready":
            self.kill()
            raise GrammarTimeoutError(f"the grammar compiler did not start within {_START_S:g} s")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class GrammarCompilerPool:
    """At most `num_workers` compiles at once, each within `timeout_s` (waiting for a free worker counts)."""

    def __init__(
        self, info: xgr.TokenizerInfo, num_workers: int = 2, timeout_s: float = 10.0, cache_bytes: int = 64 << 20
    ) -> None:
        self.info = info
        self.info_json = info.serialize_json()
        self.timeout_s = timeout_s
        self.cache_bytes = cache_bytes
        self._free: list[_Worker] = []
        self._slots = threading.Semaphore(num_workers)
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._cached_bytes = 0

    def compile(self, kind: str, source: str) -> xgr.CompiledGrammar:
        """The compiled grammar (`kind` is regex, ebnf or json_schema); GrammarCompileError for a grammar
        xgrammar refuses, GrammarTimeoutError when it would take longer than `timeout_s`."""
        key = (kind, source)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            hit = self._compile_in_worker(kind, source)
            self._remember(key, hit)
        return xgr.CompiledGrammar.deserialize_json(hit, self.info)

    def _compile_in_worker(self, kind: str, source: str) -> str:
        deadline = time.monotonic() + self.timeout_s
        if not self._slots.acquire(timeout=self.timeout_s):
            raise GrammarTimeoutError(f"no grammar compiler was free within {self.timeout_s:g} s")
        try:
            with self._lock:
                worker = self._free.pop() if self._free else None
            if worker is None or not worker.proc.is_alive():
                worker = _Worker(self.info_json)
                worker.wait_ready()
                deadline = time.monotonic() + self.timeout_s
            worker.conn.send((kind, source))
            if not worker.conn.poll(max(deadline - time.monotonic(), 0.0)):
                worker.kill()  # the only way to stop native code mid-compile
                raise GrammarTimeoutError(f"compiling took longer than {self.timeout_s:g} s")
            try:
                status, payload = worker.conn.recv()
            except (EOFError, OSError):  # the worker died (a crash inside xgrammar): a fresh one next time
                worker.kill()
                raise GrammarCompileError("the grammar compiler crashed on it") from None
            with self._lock:
                self._free.append(worker)
        finally:
            self._slots.release()
        if status != "ok":
            raise GrammarCompileError(payload)
        return payload

    def _remember(self, key: tuple[str, str], serialized: str) -> None:
        with self._lock:
            if key in self._cache or len(serialized) > self.cache_bytes:
                return
            self._cache[key] = serialized
            self._cached_bytes += len(serialized)
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= len(old)

    def close(self) -> None:
        with self._lock:
            workers, self._free = self._free, []
        for w in workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.proc.join(2)
            if w.proc.is_alive():
                w.kill()
