"""The hand-off to the engine thread: typed pool work that other threads queue and the engine runs
between its steps (the engine thread is the only one that touches the KV pool).

Two kinds, scheduled differently:

- `StoreWork`: one call that keeps pool-resident store state (a chunk prefill at ingest, a cache
  entry dropped or flushed, the prefiller built or closed). At most one runs between two steps.
- `AssemblyWork`: a request's assembly (segment loads, the reuse policy's probe and selection) as a
  generator of stages. The engine runs its stages in time slices between steps while requests decode,
  so one long assembly cannot stall everyone's inter-token latency; it stops between two stages once
  its `cancel` event is set (the client left), and closing the generator runs its `finally` blocks,
  which release what it took.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# an assembly: yields between its stages (the engine may run a step there), returns the result
Stages = Generator[None, None, T]


class AssemblyCancelled(RuntimeError):
    """The assembly's client left (its cancel event was set); what it took is released."""


@dataclass
class StoreWork(Generic[T]):
    fn: Callable[[], T]
    future: Future = field(default_factory=Future)


@dataclass
class AssemblyWork(Generic[T]):
    stages: Stages[T]
    cancel: threading.Event | None = None
    future: Future = field(default_factory=Future)
    seconds: float = 0.0  # engine-thread time spent in its stages so far

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def run_stage(self) -> bool:
        """Run one stage on the calling thread; True once the work is over (result or error delivered)."""
        if not self.future.running() and not self.future.set_running_or_notify_cancel():
            self.stages.close()
            return True
        t0 = time.perf_counter()
        try:
            if self.cancelled:
                self.stages.close()  # GeneratorExit at the stage it stopped in: its cleanup runs
                self.future.set_exception(AssemblyCancelled("assembly cancelled: the client left"))
                return True
            next(self.stages)
            return False
        except StopIteration as stop:
            self.future.set_result(stop.value)
            return True
        except BaseException as e:  # delivered to the caller
            self.future.set_exception(e)
            return True
        finally:
            self.seconds += time.perf_counter() - t0

    def run_all(self) -> T:
        """Run every stage now, on the calling thread (no loop thread: tests, the CLI)."""
        while not self.run_stage():
            pass
        return self.future.result()


def run_store_work(work: StoreWork[T]) -> None:
    if work.future.set_running_or_notify_cancel():
        try:
            work.future.set_result(work.fn())
        except BaseException as e:  # delivered to the caller
            work.future.set_exception(e)


class WorkQueue:
    """Pool work waiting for the engine thread: store work in order, assemblies in order (the head one
    runs in slices until it is over). Thread-safe; `notify` wakes the engine loop."""

    def __init__(self, notify: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._store: collections.deque[StoreWork] = collections.deque()
        self._assembly: collections.deque[AssemblyWork] = collections.deque()
        self._notify = notify

    def __bool__(self) -> bool:
        return bool(self._store or self._assembly)

    @property
    def num_assemblies(self) -> int:
        return len(self._assembly)

    def put(self, work: StoreWork | AssemblyWork) -> None:
        with self._lock:
            (self._store if isinstance(work, StoreWork) else self._assembly).append(work)  # type: ignore[arg-type]
        self._notify()

    def run_store(self, max_items: int | None = 1) -> None:
        """Run queued store work; at most `max_items` so that steps of running requests interleave.

        Invariant: none runs while an assembly is between two of its stages (it holds segments of the
        cache that store work may drop); it waits until that assembly is over."""
        if self._assembly and self._assembly[0].future.running():
            return
        done = 0
        while self._store and (max_items is None or done < max_items):
            with self._lock:
                work = self._store.popleft()
            run_store_work(work)
            done += 1

    def run_assemblies(self, slice_s: float | None) -> None:
        """Run assembly stages for about `slice_s` seconds (None: until none is left). At least one stage
        runs, so an assembly always progresses; a cancelled one is closed at its next stage."""
        t0 = time.perf_counter()
        while self._assembly:
            head = self._assembly[0]
            if head.run_stage():
                with self._lock:
                    self._assembly.popleft()
            if slice_s is not None and time.perf_counter() - t0 >= slice_s:
                return

    def fail_all(self, error: BaseException) -> None:
        """Nobody will run what is queued: fail it instead of leaving callers blocked."""
        with self._lock:
            store, self._store = list(self._store), collections.deque()
            asm, self._assembly = list(self._assembly), collections.deque()
        for s in store:
            if s.future.set_running_or_notify_cancel():
                s.future.set_exception(error)
        for a in asm:
            a.stages.close()
            if not a.future.done():
                if a.future.running() or a.future.set_running_or_notify_cancel():
                    a.future.set_exception(error)
