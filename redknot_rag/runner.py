"""The model runner: one model, its KV page pool and its attention backend on one device.

A runner has two halves. `forward(batch)` runs the model over sequence KV. The **KV-memory API** is the
only way anything else reaches pages: the store and the hot segment cache, the reuse policies, the
engine and the server all allocate, write, attach, copy-on-write, release and read through it, and
nothing outside the runner (and `kvcache`, which implements it) touches `pool` or `allocator`:

    new_seq_kv() -> SeqKV                           a sequence's KV view, named by `seq_id`
    attach(kv, seg, pos [T], visible) / attach_many share stored segments into a sequence (refcount +1)
    append(kv, pos [n]) -> slots [L, Hkv, n]        private slots for new tokens
    override(kv, index [n]) -> slots [L, Hkv, n]    copy-on-write: private slots for existing tokens
    truncate(kv, n) / release(kv)                   drop private tokens / every reference
    allocate_segment(T, visible) -> KVSegment       fresh pages (named by `segment_id`), filled by `write_pages`
    write_segment(k, v, visible) -> KVSegment       K/V [L, Hkv, T, D] into fresh pages
    drop_segment(seg)                               drop the caller's reference
    read_tokens(kv, a, b) / read_slots(slots)       K/V [..., D] copies (pre-RoPE K)
    copy_slots(src, dst, k_scale)                   write private slots from others (scaled K)
    num_pages / free_pages / can_allocate(n) / private_pages(kv) / positions_of(kv, index)

Under tensor parallelism (`tp.TPRunner`) the same API holds per rank: page bookkeeping is recorded as
typed ops and reaches the other ranks with the next batch or segment write, one control message each.

Invariants: one thread uses a runner at a time (the engine thread, or the caller before the engine
loop starts); shared segments are never written; K in the pool is pre-RoPE.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from redknot_rag.attention import AttentionBackend, create_backend
from redknot_rag.attention.probe import ProbeBackend
from redknot_rag.batch import ForwardBatch
from redknot_rag.config import EngineConfig, ModelConfig
from redknot_rag.kvcache import KVPool, KVSegment, PageAllocator, SeqKV, pool_pages_for
from redknot_rag.loader import LoadedModel, load_model
from redknot_rag.model import CausalLM
from redknot_rag.rope import Rotary
from redknot_rag.window import PoolWindows, choose_pool_windows

_T = TypeVar("_T")
log = logging.getLogger("redknot.runner")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def auto_backend(device: torch.device, cfg: ModelConfig | None = None) -> str:
    """flashinfer on CUDA when installed (it falls back to Triton per batch where it can't), else triton
    on CUDA, else the torch reference. Sliding-window models (Gemma-3) skip FlashInfer, which refuses them."""
    if device.type != "cuda":
        return "torch"
    sliding = cfg is not None and cfg.has_sliding_layers
    if importlib.util.find_spec("flashinfer") is not None and not sliding:
        return "flashinfer"
    return "triton" if importlib.util.find_spec("triton") is not None else "torch"


def load_backend(name: str, cfg: ModelConfig, pool: KVPool, rotary: Rotary) -> AttentionBackend:
    """Backend by name; GPU backends register themselves when `redknot_rag.attention.gpu` imports."""
    if name in ("flashinfer", "triton"):
        import redknot_rag.attention.gpu  # noqa: F401  (registers GPU backends)
    return create_backend(name, cfg, pool, rotary)


@dataclass(frozen=True)
class ForwardResult:
    """`logits [n, vocab]` float32 (empty when not asked for); `slots [L, Hkv, n]` where the tokens' KV went."""

    logits: torch.Tensor
    slots: torch.Tensor


class KVRunner:
    """Owns `model`, `pool`, `allocator`, `backend` and `rotary`; runs forwards over sequence KV.

    `pool` and `allocator` are the runner's own: everything else goes through the KV-memory API
    (module docstring); tests of the runner and of `kvcache` may read them white-box."""

    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.loaded = loaded or load_model(cfg.model_path, dtype=self.dtype, device=self.device)
        self.model_config: ModelConfig = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model = CausalLM(self.model_config, dict(self.loaded.weights))
        self.rotary = Rotary(self.model_config, self.device)
        self.page_size = cfg.page_size
        self.pool = KVPool(self._num_pages(), cfg.page_size, self.model_config.head_dim, self.dtype, self.device)
        self.allocator = PageAllocator(self.pool.num_pages)
        self._seq_ids = itertools.count()  # `SeqKV.seq_id`, `KVSegment.segment_id`: creation order
        self._segment_ids = itertools.count()
        # per-head windows in the pool (window.py): local blocks of engine sequences keep sink + window
        self.pool_windows: PoolWindows | None = None
        self.pool_windows_reason = "off"
        self.pages_released = 0  # page references dropped by window slides (a counter for /metrics)
        self._live: weakref.WeakValueDictionary[int, SeqKV] = weakref.WeakValueDictionary()  # by seq_id
        self.set_pool_windows(cfg.pool_local_heads)
        name = (
            auto_backend(self.device, self.model_config) if cfg.attention_backend == "auto" else cfg.attention_backend
        )
        self.backend: AttentionBackend = load_backend(name, self.model_config, self.pool, self.rotary)
        # decode CUDA graphs: captured on the first decode-only step; `cuda_graphs` may be switched off
        self.cuda_graphs = cfg.cuda_graphs and self.device.type == "cuda" and name in ("flashinfer", "triton")
        self._graphs: Any = None
        self.graph_replays = 0
        # small one-sequence prefill steps replay CUDA graphs too (flashinfer; `cuda_graphs` switches both off)
        self.prefill_graphs = cfg.cuda_graph_prefill and name == "flashinfer"
        self._prefill_graphs: Any = None
        self.prefill_graph_replays = 0
        # per layer, events of pool writes that layer's attention must wait for (`await_layers`)
        self._layer_gates: list[list[torch.cuda.Event]] | None = None

    def _num_pages(self) -> int:
        cfg, mc = self.config, self.loaded.config
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, _ = torch.cuda.mem_get_info(self.device)
            # keep room for activations of a max_prefill_tokens step (rough upper bound)
            act = 32 * cfg.max_prefill_tokens * max(mc.hidden_size, mc.intermediate_size) * 4
            budget = int(free * cfg.mem_fraction) - act
        else:
            budget = int(cfg.cpu_kv_gib * (1 << 30))
        return KVPool.pages_for_budget(budget, cfg.page_size, mc.head_dim, self.dtype)

    # ---- identity --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def weights_fingerprint(self) -> str:
        return self.loaded.weights_fingerprint

    @property
    def max_context(self) -> int:
        return self.model_config.max_position

    # ---- tensor parallelism (one rank here; `redknot_rag.tp.TPRunner` overrides these) ----------
    tp_rank = 0
    tp_size = 1

    @property
    def kv_heads(self) -> slice:
        """The model's KV heads whose pages this runner's pool holds (all of them with one rank)."""
        return slice(0, self.model_config.num_kv_heads)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank partial signal `x` (e.g. a reuse policy's per-token score `[T]`) over ranks;
        every rank gets the same values. One rank: `x` itself, no collective."""
        return x

    def on_all_ranks(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(runner, *args)` on every rank at once (reuse policies: each rank relocates and recomputes
        its own heads, `all_reduce` joins their selection signals). One rank: a plain call."""
        return fn(self, *args)

    # ---- page lifetime (the one place that increfs / decrefs) ----------------------------------
    def set_pool_windows(self, mode: str) -> None:
        """Choose the pool windows (`auto`, `profile`, `architecture`, `off`; window.py) for sequences made
        from now on; the profile is the shipped one matching these weights."""
        if self.tp_size > 1 and mode != "off":  # each rank would have to slide its heads in the same step
            self.pool_windows, self.pool_windows_reason = None, "off: not under tensor parallelism yet"
            return
        profile = None
        if mode == "profile":
            from redknot_rag.heads import load_profile_for

            profile = load_profile_for(self.loaded.name, self.weights_fingerprint)
        self.pool_windows, self.pool_windows_reason = choose_pool_windows(
            mode, self.model_config, profile, self.kv_heads
        )

    def new_seq_kv(self) -> SeqKV:
        """An empty sequence KV view `[L, Hkv, 0]` on this runner's device, named by the next `seq_id`
        (one counter per runner, in creation order: ranks that create in lockstep agree)."""
        mc = self.model_config
        kv = SeqKV(
            mc.num_layers, mc.num_kv_heads, self.page_size, self.device, windows=self.pool_windows,
            seq_id=next(self._seq_ids),
        )  # fmt: skip
        self._live[kv.seq_id] = kv  # weakly: pool-window accounting over the live sequences
        return kv

    def reservation_pages(self, num_tokens: int) -> int:
        """Pages (all blocks) a sequence of `num_tokens` private tokens may hold at once: dense for
        global blocks, sink + window + one prefill chunk for the local blocks of a windowed pool."""
        if self.pool_windows is None:
            return pool_pages_for(self.model_config, num_tokens, self.page_size)
        glob, loc = self.pool_windows.pages_for(num_tokens, self.page_size, self.config.max_prefill_tokens)
        return glob + loc

    def slide(self, kv: SeqKV) -> int:
        """After a forward: drop `kv`'s pages of local blocks that fell out of their window (window.py);
        returns the page references dropped. Not under tensor parallelism yet (each rank would slide)."""
        if self.tp_size > 1:
            return 0
        n = kv.slide(self.allocator)
        self.pages_released += n
        return n

    def pool_window_stats(self) -> dict:
        """Pool windows for /server_info and /metrics: the mode and why, and over the live sequences the
        bytes of page references held per head class and the bytes the windows released (a shared page
        counts once per sequence holding it)."""
        glob = loc = saved = 0
        for kv in list(self._live.values()):
            if kv.num_tokens:
                g, lo = kv.held_pages()
                glob, loc, saved = glob + g, loc + lo, saved + kv.released_pages()
        win, per_page = self.pool_windows, self.pool.bytes_per_page
        return {
            "mode": self.pool_windows_reason,
            "source": win.source if win is not None else "off",
            "sink": win.sink if win is not None else 0,
            "window": win.window if win is not None else 0,
            "local_blocks": win.num_local if win is not None else 0,
            "blocks": self.model_config.num_kv_blocks,
            "global_bytes": glob * per_page,
            "local_bytes": loc * per_page,
            "saved_bytes": saved * per_page,
            "pages_released_total": self.pages_released,
        }

    def attach(
        self, kv: SeqKV, segment: KVSegment, positions: torch.Tensor, visible: torch.Tensor | None = None
    ) -> None:
        """Append shared `segment` to `kv` at `positions` `[T]` (refcount +1; its pages are never written)."""
        kv.attach(segment, positions, self.allocator, visible)

    def attach_many(self, kv: SeqKV, items: list[tuple[KVSegment, torch.Tensor, torch.Tensor | None]]) -> None:
        """Append shared segments `(segment, positions [T], visible | None)` in order: one device
        concatenation of their slot tables (relocating 64 chunks is a few launches, no per-token work)."""
        kv.attach_many(items, self.allocator)

    def append(self, kv: SeqKV, positions: torch.Tensor) -> torch.Tensor:
        """Private slots for new tokens at `positions` `[n]` of `kv`: `[L, Hkv, n]`."""
        return kv.append(positions, self.allocator)

    def override(self, kv: SeqKV, token_index: torch.Tensor) -> torch.Tensor:
        """Copy-on-write slots for tokens `token_index` `[n]` of `kv`; returns them `[L, Hkv, n]`."""
        return kv.override(token_index, self.allocator)

    def truncate(self, kv: SeqKV, n: int) -> None:
        kv.truncate(n, self.allocator)

    def release(self, kv: SeqKV | None) -> None:
        """Drop every page reference `kv` holds (idempotent; None is a no-op)."""
        if kv is not None:
            kv.release(self.allocator)

    def allocate_segment(self, num_tokens: int, visible: torch.Tensor | None = None) -> KVSegment:
        """Fresh pages for a shared segment of `num_tokens` tokens, every layer and KV head of this rank:
        `pages` `[L, Hkv, ceil(T / page_size)]`, one reference (the caller's). Not written: the caller
        fills them through `write_pages` before anything reads the segment. `visible` `[L, Hkv, T]`:
        the tokens whose K/V exist per head (None: all)."""
        return self._new_segment(num_tokens, visible)

    def _new_segment(self, num_tokens: int, visible: torch.Tensor | None) -> KVSegment:
        mc = self.model_config
        num_pages = -(-num_tokens // self.page_size)
        ids = self.allocator.allocate(mc.num_layers * mc.num_kv_heads * num_pages)
        pages = torch.from_numpy(ids).view(mc.num_layers, mc.num_kv_heads, num_pages)
        return KVSegment(pages, num_tokens, is_shared=True, visible=visible, segment_id=next(self._segment_ids))

    def write_pages(self, issue: Callable[[torch.Tensor, torch.Tensor], _T]) -> _T:
        """`issue(k_slots, v_slots)` (the pool as `[num_pages * page_size, D]` slot views) queues copies
        into pages of segments from `allocate_segment` (a load plan, on any stream); returns its result.
        The only hand-out of pool memory: the writer may touch only the pages it was given."""
        return issue(self.pool.k_slots, self.pool.v_slots)

    def write_segment(self, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None) -> KVSegment:
        """Copy K/V `[L, Hkv, T, D]` into fresh pool pages: a shared segment whose one reference is the caller's.

        `visible` `[L, Hkv, T]` marks the tokens whose K/V exist per head (None: all); the rest is never read.
        """
        seg = self._new_segment(k.shape[2], visible)
        slots = seg.slots(self.page_size).to(self.device)  # [L, Hkv, T]
        self.pool.k_slots[slots] = k.to(self.device, self.dtype)
        self.pool.v_slots[slots] = v.to(self.device, self.dtype)
        return seg

    def drop_segment(self, segment: KVSegment) -> None:
        """Drop the caller's reference to a segment (pages free when no sequence holds them)."""
        self.allocator.decref(segment.pages.numpy(), unique=True)

    def segment_pages(self, k: torch.Tensor) -> int:
        """Pages a segment of K `[L, Hkv, T, D]` occupies."""
        return k.shape[0] * k.shape[1] * -(-k.shape[2] // self.page_size)

    def read_tokens(self, kv: SeqKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of tokens [start, end) of `kv`: `[L, Hkv, T, D]` each (pre-RoPE K), on the pool's device."""
        self.settle_layers()
        slots = kv.slots[:, :, start:end].to(self.device)
        return self.pool.k_slots[slots].clone(), self.pool.v_slots[slots].clone()

    def read_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at pool `slots` `[...]` (e.g. `[L, Hkv, n]` from `append` or `kv.slots`): `[..., D]` copies
        each, pre-RoPE K, pool dtype, on the pool's device. Call `settle_layers` first where pool writes
        may still be in flight (a forward's own writes are ordered already)."""
        slots = slots.to(self.device)
        return self.pool.k_slots[slots], self.pool.v_slots[slots]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, k_scale: float = 1.0) -> None:
        """Write slots `dst` from slots `src` (same shape `[...]`): V copied, K times `k_scale` (in float32,
        rounded to the pool dtype once). `dst` must be private slots of the caller (`append`/`override`):
        shared segment pages are never written."""
        src, dst = src.to(self.device), dst.to(self.device)
        k = self.pool.k_slots
        k[dst] = (k[src].float() * k_scale).to(k.dtype)
        self.pool.v_slots[dst] = self.pool.v_slots[src]

    # ---- page accounting (scheduler, server gauges, the hot cache) -------------------------------
    @property
    def num_pages(self) -> int:
        """Pages of this rank's pool (each holds `page_size` tokens of one (layer, KV head))."""
        return self.pool.num_pages

    @property
    def free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def pool_bytes(self) -> int:
        """Bytes of this rank's pool (K and V of every page)."""
        return self.pool.num_bytes

    def can_allocate(self, num_pages: int) -> bool:
        return self.allocator.can_allocate(num_pages)

    def private_pages(self, kv: SeqKV) -> int:
        """Private page references `kv` holds for appended tokens, over all its (layer, KV head) blocks,
        after pool-window releases: what the scheduler's reservation of it has used so far."""
        return kv.private_pages_held()

    def positions_of(self, kv: SeqKV, token_index: torch.Tensor) -> torch.Tensor:
        """RoPE positions of tokens `token_index` `[n]` of `kv`: `[n]` int64 on the host."""
        return kv.positions[token_index.to(kv.device)].cpu()

    # ---- layer gates: pool writes still in flight on another stream -----------------------------
    def await_layers(self, events: Sequence[torch.cuda.Event | None]) -> None:
        """Make later work wait, on the device, for `events[l]` before anything reads layer l of the
        pool: eager forwards wait per layer as they reach it (so a layer-major load overlaps the
        forward), every other pool reader (graph replays, `read_tokens`, `settle_layers`) waits for
        all. The host never blocks. Invariant: a gate is dropped only after the current stream waited
        on it, and stream order keeps every later kernel behind that wait."""
        if not any(ev is not None for ev in events):
            return
        if self._layer_gates is None:
            self._layer_gates = [[] for _ in range(self.model_config.num_layers)]
        for gate, ev in zip(self._layer_gates, events, strict=False):
            if ev is not None:
                gate.append(ev)

    def _gate(self, layer: int) -> None:
        """The device wait before `layer` reads the pool (model.forward's per-layer hook)."""
        gates = self._layer_gates
        if gates is None or not gates[layer]:
            return
        stream = torch.cuda.current_stream(self.device)
        for ev in gates[layer]:
            stream.wait_event(ev)
        gates[layer] = []
        if not any(gates):
            self._layer_gates = None

    def settle_layers(self) -> None:
        """Wait (on the device) for every gated pool write: before a reader that is not an eager forward."""
        if self._layer_gates is not None:
            for layer in range(len(self._layer_gates)):
                self._gate(layer)

    # ---- forwards --------------------------------------------------------------------------
    def forward(
        self, batch: ForwardBatch, backend: AttentionBackend | None = None, num_layers: int | None = None
    ) -> torch.Tensor:
        """Run `batch` (its KV already appended) → logits `[len(batch.logit_rows), vocab]` float32.

        A decode-only batch on the runner's own backend replays a captured CUDA graph when it fits the
        graphs' static tables (page-aligned sequences, FlashInfer; any layout, Triton); so does a
        one-sequence prefill of <= 128 tail tokens of a page-aligned sequence (FlashInfer); else eager."""
        if backend is None and num_layers is None and self.cuda_graphs and batch.seqs:
            self.settle_layers()  # a graph replay cannot wait per layer
            if all(s.is_decode for s in batch.seqs):
                graphs = self._decode_graphs()
                slot = graphs.prepare(batch) if graphs is not None else None
                if slot is not None:
                    self.graph_replays += 1
                    return graphs.replay(slot, len(batch.seqs))
            elif self.prefill_graphs and len(batch.seqs) == 1 and batch.num_tokens <= 128:
                pg = self._prefill_graph_runner()
                bucket = pg.prepare(batch) if pg is not None else None
                if bucket is not None:
                    self.prefill_graph_replays += 1
                    return pg.replay(bucket, int(batch.logit_rows.shape[0]))
        gate = self._gate if self._layer_gates is not None else None
        return self.model.forward(batch, backend or self.backend, num_layers=num_layers, before_layer=gate)

    def _decode_graphs(self) -> Any:
        """The `DecodeGraphRunner`, captured once (buckets up to max_running_requests); None if capture failed."""
        if self._graphs is None:
            from redknot_rag.graphs.decode import DEFAULT_BATCH_SIZES, DecodeGraphRunner

            cfg, mc = self.config, self.model_config
            sizes = tuple(b for b in DEFAULT_BATCH_SIZES if b < cfg.max_running_requests)
            sizes += (cfg.max_running_requests,)
            cap = cfg.max_running_requests * mc.num_kv_heads * cfg.cuda_graph_context
            try:
                graphs = DecodeGraphRunner(self.model, self.backend, max_kv_tokens=cap, batch_sizes=sizes)
                graphs.capture()
                self._graphs = graphs
            except Exception:  # keep serving eagerly; the reason goes to the log
                log.exception("decode CUDA graph capture failed; decoding eagerly")
                self.cuda_graphs = False
        return self._graphs

    def _prefill_graph_runner(self) -> Any:
        """The `PrefillGraphRunner` (buckets 16-128 tokens over up to the model's context), captured once;
        None if capture failed (logged once; small prefills then run eagerly)."""
        if self._prefill_graphs is None:
            from redknot_rag.graphs.prefill import PrefillGraphRunner

            try:
                graphs = PrefillGraphRunner(self.model, self.backend, max_kv_tokens=self.max_context)  # type: ignore[arg-type]
                graphs.capture()
                self._prefill_graphs = graphs
            except Exception:  # keep serving eagerly; the reason goes to the log
                log.exception("prefill CUDA graph capture failed; small prefills run eagerly")
                self.prefill_graphs = False
        return self._prefill_graphs

    def append_forward(
        self,
        kv: SeqKV,
        ids: list[int],
        positions: torch.Tensor,
        *,
        backend: AttentionBackend | None = None,
        logits: bool = False,
        num_layers: int | None = None,
    ) -> ForwardResult:
        """Append `ids` at `positions` `[n]` to `kv` (private slots) and run them through the model."""
        slots = self.append(kv, positions)
        rows = torch.arange(len(ids)) if logits else torch.zeros(0, dtype=torch.int64)
        batch = ForwardBatch(torch.tensor(ids), positions, [kv.slice(0, len(ids), slots)], rows)
        return ForwardResult(self.forward(batch, backend, num_layers), slots)

    def recompute(self, kv: SeqKV, ids: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """Recompute the KV of tokens `token_index` `[n]` (ascending) of `kv`, whose token ids are `ids` `[n]`.

        Each attends to everything at or before its position (reused KV for the rest, fresh KV of the other
        recomputed tokens); the results go to copy-on-write slots. Returns those slots `[L, Hkv, n]`.
        """
        new_slots = self.override(kv, token_index)
        pos = self.positions_of(kv, token_index)  # host positions: backends plan on the host
        n = int(token_index.numel())
        batch = ForwardBatch(ids, pos, [kv.slice(0, n, new_slots)], torch.zeros(0, dtype=torch.int64))
        self.forward(batch)
        return new_slots

    def probe_backend(self, layers: list[int] | None = None) -> ProbeBackend:
        """A backend that records question attention (reuse selection, head profiling); `layers`: only
        those layers (None: all)."""
        return ProbeBackend(self.model_config, self.pool, self.rotary, inner=self.backend, layers=layers)

    def backend_named(self, name: str) -> AttentionBackend:
        """A fresh attention backend `name` over this runner's pool (benches compare backends on one pool)."""
        return load_backend(name, self.model_config, self.pool, self.rotary)

    def info(self) -> dict:
        mc = self.model_config
        return {
            "model": self.loaded.name,
            "arch": mc.arch,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "layers": mc.num_layers,
            "q_heads": mc.num_q_heads,
            "kv_heads": mc.num_kv_heads,
            "head_dim": mc.head_dim,
            "context": mc.max_position,
            "page_size": self.page_size,
            "pool_pages": self.pool.num_pages,
            "pool_gib": round(self.pool.num_bytes / (1 << 30), 3),
            "pool_free_pages": self.allocator.num_free,
            "attention_backend": self.backend.name,
            "pool_windows": self.pool_window_stats(),
        }
