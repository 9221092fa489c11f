"""CPU-side prefetch: load chunks' blocks layer by layer on a background thread.

Invariant: work runs in submission order on one thread, and a request is submitted layer-major
(every chunk's layer 0, then every chunk's layer 1, ...), so the future of (chunk, layer l)
resolves no later than anything of layer l + 1: a caller running layer l waits only for layer l.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from redknot_rag.store.tiers import KVBlock


class BlockSource(Protocol):
    """What a prefetcher reads from (`ChunkKVStore`; a protocol so this module never imports it)."""

    def meta(self, chunk_key: str) -> Any: ...

    def get_blocks(self, chunk_key: str, layers: Sequence[int], heads: Sequence[int] | None) -> Any: ...


LayerBlocks = dict[int, KVBlock]  # kv_head -> block of one (chunk, layer)
HeadPicker = Callable[[str, int], Sequence[int] | None]  # (chunk_key, layer) -> heads to load (None: all)


@dataclass(frozen=True)
class Prefetch:
    """Handle of one prefetch: a future per (chunk_key, layer) -> {head: KVBlock}, or None on a miss."""

    chunk_keys: tuple[str, ...]
    layers: tuple[int, ...]
    futures: dict[tuple[str, int], Future[LayerBlocks | None]]

    def future(self, chunk_key: str, layer: int) -> Future[LayerBlocks | None]:
        return self.futures[(chunk_key, layer)]

    def wait_layer(self, layer: int, timeout: float | None = None) -> dict[str, LayerBlocks | None]:
        """Every chunk's blocks of `layer` (None for a chunk that missed); waits only for this layer."""
        return {key: self.futures[(key, layer)].result(timeout) for key in self.chunk_keys}

    def cancel(self) -> int:
        """Cancel what has not started; returns how many (chunk, layer) loads were cancelled."""
        return sum(f.cancel() for f in self.futures.values())

    def done(self) -> bool:
        return all(f.done() for f in self.futures.values())


class Prefetcher:
    """One background thread per store; see the module invariant."""

    def __init__(self, store: BlockSource) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-prefetch")

    def submit(
        self, chunk_keys: Sequence[str], layers: Sequence[int] | None = None, heads: HeadPicker | None = None
    ) -> Prefetch:
        keys = tuple(dict.fromkeys(chunk_keys))
        if layers is None:
            metas = [self.store.meta(k) for k in keys]
            num_layers = max((m.num_layers for m in metas if m is not None), default=0)
            layers = range(num_layers)
        ls = tuple(layers)
        futures: dict[tuple[str, int], Future[LayerBlocks | None]] = {}
        for layer in ls:  # layer-major: see the module invariant
            for key in keys:
                futures[(key, layer)] = self._pool.submit(self._load, key, layer, heads)
        return Prefetch(keys, ls, futures)

    def _load(self, chunk_key: str, layer: int, heads: HeadPicker | None) -> LayerBlocks | None:
        hs = heads(chunk_key, layer) if heads is not None else None
        got = self.store.get_blocks(chunk_key, [layer], hs)
        return None if got is None else {h: blk for (_, h), blk in got.items()}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["CancelledError", "LayerBlocks", "Prefetch", "Prefetcher"]
