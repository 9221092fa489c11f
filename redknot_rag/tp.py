"""Tensor parallelism over KV heads: one process per device, rank 0 drives, the others follow.

Design (the simplest one that keeps the engine unchanged):

- **Shards.** Rank r of N holds q heads `[r·Hq/N, (r+1)·Hq/N)`, KV heads `[r·Hkv/N, (r+1)·Hkv/N)`
  (column-parallel q/k/v, so GQA groups never straddle ranks), intermediate columns
  `[r·I/N, (r+1)·I/N)` of gate/up, and the matching input columns of o/down (row-parallel; one
  all-reduce after each). Embedding, norms and lm_head are replicated. Each rank's `KVRunner` is an
  ordinary runner over a shard `ModelConfig` (`num_kv_heads = Hkv/N` ...), so its page pool holds
  only its own heads' pages.
- **Rank 0 drives.** The engine, the HTTP server, retrieval and the chunk store run on rank 0 only.
  Every runner call that touches pages or the model (`new_seq_kv`, `attach`, `attach_many`, `append`, `override`,
  `truncate`, `release`, `write_segment`, `drop_segment`, `read_tokens`, `forward`, `append_forward`,
  `recompute`, `on_all_ranks`) is sent to the other ranks (a gloo group: control on the host, data on
  NCCL) and run locally; followers (`TPRunner.follow`) replay it on their own shard. Bookkeeping calls
  queue and go with the next call that runs a collective: one broadcast per engine step.
- **Lockstep.** Every rank runs the same allocator operations in the same order on a pool of the
  same page count, so page ids, sequence slot tables and handle numbers agree on every rank. Python
  objects (`SeqKV`, `KVSegment`) cross as handles; a follower keeps its twin of each until rank 0's
  object is garbage-collected.
- **Chunk KV at the boundary is head-complete.** `read_tokens` all-gathers the heads and
  `write_segment` takes all heads and keeps this rank's, so the chunk store (memory, disk, Redis) and
  its keys and fingerprints are the same at any TP degree: replicas with TP=1 and TP=2 share blocks.
- **Reuse runs on every rank.** `Assembler.build` calls `runner.on_all_ranks(policy.assemble, inp)`:
  each rank relocates and recomputes its own heads, and the selection signal (CacheBlend's KV
  deviation, RedKnot's probe attention) is summed with `all_reduce` (then broadcast from rank 0, so
  it is bit-identical) so that every rank recomputes the same tokens.

With one rank none of this exists: `KVRunner` has no collectives (`all_reduce` is the identity).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from redknot_rag.attention import AttentionBackend
from redknot_rag.batch import ForwardBatch, SeqSlice
from redknot_rag.config import EngineConfig, ModelConfig
from redknot_rag.kvcache import KVSegment, SeqKV
from redknot_rag.loader import LoadedModel, load_model
from redknot_rag.ports import free_port
from redknot_rag.runner import ForwardResult, KVRunner, pick_device, pick_dtype

log = logging.getLogger("redknot.tp")

_STOP = "stop"
# calls that run collectives: the followers must join them now (everything else may wait in the queue)
# (`write_segment` too: its payload is a whole chunk's K/V, better sent now than piled up in the queue)
_FLUSH = frozenset({"forward", "append_forward", "recompute", "read_tokens", "_run_fn", "write_segment"})
_CONTROL_TIMEOUT = timedelta(days=365)  # followers wait for the next step as long as the server lives


class TPConfigError(ValueError):
    """A model that does not shard over the asked number of ranks."""


def shard_config(mc: ModelConfig, tp_size: int) -> ModelConfig:
    """The per-rank shape: `Hq/N` q heads, `Hkv/N` KV heads, `I/N` intermediate (raises if any does not divide)."""
    if tp_size < 1:
        raise TPConfigError(f"tensor parallel size must be >= 1, got {tp_size}")
    for what, n in (
        ("KV heads", mc.num_kv_heads),
        ("attention heads", mc.num_q_heads),
        ("intermediate size", mc.intermediate_size),
    ):
        if n % tp_size:
            raise TPConfigError(
                f"--tp {tp_size}: the model's {what} ({n}) do not divide by {tp_size}; "
                f"KV heads shard whole across ranks (this model has {mc.num_kv_heads} KV heads)"
            )
    return dataclasses.replace(
        mc,
        num_q_heads=mc.num_q_heads // tp_size,
        num_kv_heads=mc.num_kv_heads // tp_size,
        intermediate_size=mc.intermediate_size // tp_size,
    )


def shard_weights(weights: dict[str, torch.Tensor], mc: ModelConfig, rank: int, size: int) -> dict[str, torch.Tensor]:
    """This rank's HF-named weights: q/k/v (and their biases) by heads, gate/up by rows, o/down by
    columns; everything else shared. Shards are contiguous copies (the full tensors can be freed)."""
    d = mc.head_dim
    hq, hkv, inter = mc.num_q_heads // size, mc.num_kv_heads // size, mc.intermediate_size // size
    rows = {
        "q_proj": (rank * hq * d, (rank + 1) * hq * d),
        "k_proj": (rank * hkv * d, (rank + 1) * hkv * d),
        "v_proj": (rank * hkv * d, (rank + 1) * hkv * d),
        "gate_proj": (rank * inter, (rank + 1) * inter),
        "up_proj": (rank * inter, (rank + 1) * inter),
    }
    cols = {"o_proj": (rank * hq * d, (rank + 1) * hq * d), "down_proj": (rank * inter, (rank + 1) * inter)}
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        proj = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if proj in rows and name.endswith((".weight", ".bias")):
            a, b = rows[proj]
            out[name] = w[a:b].contiguous()  # [out/N, in] or bias [out/N]
        elif proj in cols and name.endswith(".weight"):
            a, b = cols[proj]
            out[name] = w[:, a:b].contiguous()  # [hidden, in/N]
        else:
            out[name] = w
    return out


def init_from_env(device: str) -> tuple[int, int, int]:
    """`torch.distributed` from torchrun-style env (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    `MASTER_PORT`): NCCL when the device is CUDA, else gloo. Returns (rank, world size, local rank)."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        is_cuda = pick_device(device).type == "cuda"
        if is_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if is_cuda else "gloo", rank=rank, world_size=size)
    return rank, size, local


def check_divides(model_path: str | None, tp_size: int) -> ModelConfig:
    """Read the model's config only (no weights) and refuse a TP size its heads do not divide by."""
    from transformers import AutoConfig

    from redknot_rag.loader import resolve_model_dir

    model_dir, _, _ = resolve_model_dir(model_path)
    return shard_config(ModelConfig.from_hf(AutoConfig.from_pretrained(model_dir)), tp_size)


def start_ranks(tp_size: int) -> list[subprocess.Popen]:
    """torchrun-style launch from one command: unless `WORLD_SIZE` is already set (torchrun did it), this
    process becomes rank 0 and ranks 1..N-1 start as copies of this command line (`python -m
    redknot_rag.cli <same args>`) with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR/PORT` set."""
    if "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != tp_size:
            raise TPConfigError(f"--tp {tp_size} but WORLD_SIZE={os.environ['WORLD_SIZE']}")
        return []
    port = free_port()
    base = {"WORLD_SIZE": str(tp_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    children = []
    for r in range(1, tp_size):
        env = {**os.environ, **base, "RANK": str(r), "LOCAL_RANK": str(r)}
        children.append(subprocess.Popen([sys.executable, "-m", "redknot_rag.cli", *sys.argv[1:]], env=env))
    os.environ.update(base, RANK="0", LOCAL_RANK="0")
    return children


def launch(config: EngineConfig, tp_size: int) -> TPRunner | None:
    """`redknot serve --tp N`: check the model shards, start the ranks, build this rank's runner. Rank 0
    gets its `TPRunner` back (serve with it, then `close()`); a follower replays rank 0's calls until
    it closes, then gets None."""
    check_divides(config.model_path, tp_size)
    children = start_ranks(tp_size)
    _, _, local = init_from_env(config.device)
    if pick_device(config.device).type == "cuda":
        config = dataclasses.replace(config, device=f"cuda:{local}")
    runner = TPRunner(config)
    runner._children = children
    if runner.tp_rank == 0:
        return runner
    runner.follow()
    dist.destroy_process_group()
    return None


@dataclasses.dataclass(frozen=True)
class _Handle:
    """A `SeqKV` or `KVSegment` by number, the same on every rank."""

    id: int


@dataclasses.dataclass(frozen=True)
class _SliceRef:
    """A `SeqSlice` on the wire: its sequence by handle (each rank slices its own twin). `new_slots` is
    None when they are the sequence's last `q_len` slots (appended tokens: the usual case)."""

    kv: _Handle
    q_start: int
    q_len: int
    num_kv: int
    new_slots: torch.Tensor | None


class TPRunner(KVRunner):
    """A `KVRunner` over this rank's shard; on rank 0 its pool/model calls are mirrored to the followers.

    Needs `torch.distributed` initialized (`init_from_env`). `loaded` is the full model (or None: load
    `config.model_path` onto this rank's device); it is sharded here and its weights dict is emptied, so
    the full tensors are freed (when the caller holds no other reference) before the pool is sized.
    """

    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TPRunner needs torch.distributed initialized (see redknot_rag.tp.init_from_env)")
        cfg = config or EngineConfig()
        self.tp_rank, self.tp_size = dist.get_rank(), dist.get_world_size()  # type: ignore[misc]
        full = loaded or load_model(
            cfg.model_path, dtype=pick_dtype(cfg.dtype, pick_device(cfg.device)), device=pick_device(cfg.device)
        )
        self.full_config = full.config
        local_cfg = shard_config(full.config, self.tp_size)
        shard = LoadedModel(
            local_cfg,
            shard_weights(full.weights, full.config, self.tp_rank, self.tp_size),
            full.tokenizer,
            full.name,
            full.weights_fingerprint,
        )
        full.weights = {}  # the unsharded q/k/v/o/MLP tensors go now, not after the pool took its share
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # control messages on the host (gloo) whatever the data backend is
        self._ctrl = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
        self._depth = 0  # > 0 inside a mirrored call: nested runner calls run locally only
        self._next_handle = 0
        self._objects: dict[int, Any] = {}  # followers: handle → twin
        self._live_kv: dict[int, weakref.ref[SeqKV]] = {}  # rank 0: handle → sequence (to name slices)
        self._forget: list[int] = []  # rank 0: handles whose object died (sent with the next call)
        self._forget_lock = threading.Lock()
        self._pending: list[tuple[str, Any, Any]] = []  # rank 0: queued calls without collectives
        self._appended: dict[int, weakref.ref[torch.Tensor]] = {}  # rank 0: slots `append` just returned
        self._children: list[subprocess.Popen] = []  # follower processes this rank started (`launch`)
        super().__init__(cfg, shard)
        self.cuda_graphs = False  # decode graphs are captured per process; not across ranks' collectives yet
        self.model.reduce = self._reduce_sum

    # ---- shape ---------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> slice:
        h = self.model_config.num_kv_heads
        return slice(self.tp_rank * h, (self.tp_rank + 1) * h)

    def _num_pages(self) -> int:
        """The smallest page count over ranks: every rank's pool has the same pages (lockstep)."""
        n = torch.tensor([super()._num_pages()], dtype=torch.int64)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self._ctrl)
        return int(n.item())

    def segment_pages(self, k: torch.Tensor) -> int:
        """Pages a head-complete segment K `[L, Hkv_full, T, D]` takes in this rank's pool."""
        return k.shape[0] * self.model_config.num_kv_heads * -(-k.shape[2] // self.page_size)

    # ---- collectives -----------------------------------------------------------------------------
    def _reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self._depth == 0:
            raise RuntimeError("all_reduce outside a mirrored call: run the caller through runner.on_all_ranks")
        y = x.to(self.device).contiguous()  # NCCL reduces device tensors only
        dist.all_reduce(y)
        dist.broadcast(y, 0)  # identical bits on every rank, whatever the reduction order was
        return y.to(x.device)

    # ---- mirroring -------------------------------------------------------------------------------
    def _register(self, obj: Any) -> Any:
        """Number a new SeqKV/KVSegment (the same number on every rank: creation order is lockstep)."""
        h = self._next_handle
        self._next_handle += 1
        if self.tp_rank == 0:
            obj._tp_handle = h
            if isinstance(obj, SeqKV):
                self._live_kv[h] = weakref.ref(obj)
            weakref.finalize(obj, self._forget_later, h)
        else:
            self._objects[h] = obj
        return obj

    def _forget_later(self, h: int) -> None:
        with self._forget_lock:
            self._forget.append(h)
            self._live_kv.pop(h, None)

    def _slice_ref(self, x: SeqSlice, by_ptr: dict[int, SeqKV]) -> _SliceRef:
        """Name the sequence a slice views (its slot table is a view of that SeqKV's `slots`)."""
        kv = by_ptr.get(x.kv_slots.data_ptr())
        if kv is None:
            raise RuntimeError("a SeqSlice not made from a sequence of this runner cannot cross ranks")
        ref = self._appended.pop(id(x.new_slots), None)
        is_tail = ref is not None and ref() is x.new_slots and x.num_kv == kv.num_tokens  # no device sync
        new_slots = None if is_tail else x.new_slots.cpu()
        return _SliceRef(_Handle(kv._tp_handle), x.q_start, x.q_len, x.num_kv, new_slots)  # type: ignore[attr-defined]

    def _encode(self, x: Any) -> Any:
        if isinstance(x, (SeqKV, KVSegment)):
            h = getattr(x, "_tp_handle", None)
            if h is None:
                if isinstance(x, SeqKV) or x.num_tokens:
                    raise RuntimeError(f"a {type(x).__name__} not made by this runner cannot cross ranks")
                return x  # an empty segment: by value
            return _Handle(h)
        if isinstance(x, ForwardBatch):  # followers need no logits
            with self._forget_lock:
                live = [r() for r in self._live_kv.values()]
            by_ptr = {kv.slots.data_ptr(): kv for kv in live if kv is not None}
            seqs = [self._slice_ref(sl, by_ptr) for sl in x.seqs]
            return ForwardBatch(x.input_ids, x.positions, seqs, torch.zeros(0, dtype=torch.int64))  # type: ignore[arg-type]
        if isinstance(x, (list, tuple)):
            return type(x)(self._encode(v) for v in x)
        if isinstance(x, dict):
            return {k: self._encode(v) for k, v in x.items()}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.replace(
                x, **{f.name: self._encode(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
            )
        if isinstance(x, torch.Tensor):
            return x.cpu() if x.device.type != "cpu" else x
        return x

    def _decode(self, x: Any) -> Any:
        if isinstance(x, _Handle):
            return self._objects[x.id]
        if isinstance(x, _SliceRef):
            kv = self._objects[x.kv.id]
            if kv.num_tokens != x.num_kv:
                raise RuntimeError(
                    f"tensor-parallel ranks out of step: {kv.num_tokens} kv tokens, rank 0 has {x.num_kv}"
                )
            slots = x.new_slots
            if slots is None:  # the usual case: the slots just appended at the sequence's tail
                slots = kv.slots[:, :, x.num_kv - x.q_len : x.num_kv]
            return kv.slice(x.q_start, x.q_len, slots.to(kv.slots.device))
        if isinstance(x, ForwardBatch):
            return ForwardBatch(x.input_ids, x.positions, [self._decode(s) for s in x.seqs], x.logit_rows)
        if isinstance(x, (list, tuple)):
            return type(x)(self._decode(v) for v in x)
        if isinstance(x, dict):
            return {k: self._decode(v) for k, v in x.items()}
        if dataclasses.is_dataclass(x) and not isinstance(x, type) and not isinstance(x, (SeqKV, KVSegment)):
            return dataclasses.replace(
                x, **{f.name: self._decode(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
            )
        return x

    def _send(self, msg: Any) -> Any:
        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self._ctrl)
        return box[0]

    def _mirrored(self, op: str, local: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        """On rank 0 at the outermost call: queue `(op, args)` for the followers, then run `local()`.

        Page bookkeeping calls (no collective inside) only queue; a call that runs a collective (`_FLUSH`)
        sends the queue and itself in one message, so a decode step of B sequences costs one broadcast,
        not B + 1. Followers need to be current only when they join a collective."""
        if self.tp_rank == 0 and self._depth == 0:
            self._pending.append((op, self._encode(args), self._encode(kwargs)))
            if op in _FLUSH:
                self._flush()
        self._depth += 1
        try:
            return local()
        finally:
            self._depth -= 1

    def _flush(self) -> None:
        with self._forget_lock:
            forget, self._forget = self._forget, []
        ops, self._pending = self._pending, []
        self._send((ops, forget))

    def follow(self) -> None:
        """Followers: replay rank 0's calls until it sends stop (`close`)."""
        if self.tp_rank == 0:
            raise RuntimeError("rank 0 drives; only followers follow")
        while True:
            msg = self._send(None)
            if msg == _STOP:
                return
            ops, forget = msg
            for op, args, kwargs in ops:
                try:
                    getattr(self, op)(*self._decode(args), **self._decode(kwargs))
                except Exception:  # rank 0 met the same error in the same call (lockstep)
                    log.exception("tensor-parallel follower: %s failed", op)
            for h in forget:  # after the ops: they may still have named these objects
                self._objects.pop(h, None)

    def close(self) -> None:
        """Rank 0: release the followers (they return from `follow`). Idempotent."""
        if self.tp_rank == 0 and not getattr(self, "_closed", False):
            self._closed = True
            if self._pending:
                self._flush()
            self._send(_STOP)
            for p in self._children:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()

    # ---- the mirrored runner calls ---------------------------------------------------------------
    def new_seq_kv(self) -> SeqKV:
        return self._mirrored("new_seq_kv", lambda: self._register(super(TPRunner, self).new_seq_kv()))

    def attach(
        self, kv: SeqKV, segment: KVSegment, positions: torch.Tensor, visible: torch.Tensor | None = None
    ) -> None:
        self._mirrored("attach", lambda: super(TPRunner, self).attach(kv, segment, positions, visible),
                       kv, segment, positions, visible)  # fmt: skip

    def attach_many(self, kv: SeqKV, items: list[tuple[KVSegment, torch.Tensor, torch.Tensor | None]]) -> None:
        self._mirrored("attach_many", lambda: super(TPRunner, self).attach_many(kv, items), kv, items)

    def append(self, kv: SeqKV, positions: torch.Tensor) -> torch.Tensor:
        out = self._mirrored("append", lambda: super(TPRunner, self).append(kv, positions), kv, positions)
        if self.tp_rank == 0:  # these slots are kv's tail: a slice over them crosses ranks without them
            key = id(out)

            def forget(_: weakref.ref[torch.Tensor]) -> None:
                self._appended.pop(key, None)

            self._appended[key] = weakref.ref(out, forget)
        return out

    def override(self, kv: SeqKV, token_index: torch.Tensor) -> torch.Tensor:
        return self._mirrored("override", lambda: super(TPRunner, self).override(kv, token_index), kv, token_index)

    def truncate(self, kv: SeqKV, n: int) -> None:
        self._mirrored("truncate", lambda: super(TPRunner, self).truncate(kv, n), kv, n)

    def release(self, kv: SeqKV | None) -> None:
        if kv is not None:
            self._mirrored("release", lambda: super(TPRunner, self).release(kv), kv)

    def write_segment(self, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None) -> KVSegment:
        """K/V of all heads `[L, Hkv_full, T, D]` (and `visible` `[L, Hkv_full, T]`) in; this rank keeps
        its heads `[L, Hkv/N, T, D]`."""
        heads = self.kv_heads

        def local() -> KVSegment:
            vis = None if visible is None else visible[:, heads]
            return self._register(super(TPRunner, self).write_segment(k[:, heads], v[:, heads], vis))

        return self._mirrored("write_segment", local, k, v, visible)

    def drop_segment(self, segment: KVSegment) -> None:
        self._mirrored("drop_segment", lambda: super(TPRunner, self).drop_segment(segment), segment)

    def read_tokens(self, kv: SeqKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of all heads `[L, Hkv_full, T, D]` (gathered over ranks), on every rank."""

        def local() -> tuple[torch.Tensor, torch.Tensor]:
            k, v = super(TPRunner, self).read_tokens(kv, start, end)  # [L, Hkv/N, T, D]
            return self._gather_heads(k), self._gather_heads(v)

        return self._mirrored("read_tokens", local, kv, start, end)

    def _gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=1)  # [L, Hkv_full, T, D], heads in rank order

    def forward(
        self, batch: ForwardBatch, backend: AttentionBackend | None = None, num_layers: int | None = None
    ) -> torch.Tensor:
        if backend is not None and self._depth == 0:
            raise NotImplementedError(
                "a custom attention backend (probe) under tensor parallelism runs only inside runner.on_all_ranks"
            )
        return self._mirrored(
            "forward", lambda: super(TPRunner, self).forward(batch, backend, num_layers), batch, None, num_layers
        )

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
        if backend is not None and self._depth == 0:
            raise NotImplementedError(
                "a custom attention backend (probe) under tensor parallelism runs only inside runner.on_all_ranks"
            )

        def local() -> ForwardResult:
            return super(TPRunner, self).append_forward(
                kv, ids, positions, backend=backend, logits=logits, num_layers=num_layers
            )

        return self._mirrored("append_forward", local, kv, ids, positions, logits=logits, num_layers=num_layers)

    def recompute(self, kv: SeqKV, ids: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        return self._mirrored(
            "recompute", lambda: super(TPRunner, self).recompute(kv, ids, token_index), kv, ids, token_index
        )

    def on_all_ranks(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn` must pickle (a module-level function or a bound method of a picklable object)."""
        return self._mirrored("_run_fn", lambda: fn(self, *args), fn, *args)

    def _run_fn(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._depth += 1
        try:
            return fn(self, *args)
        finally:
            self._depth -= 1

    def info(self) -> dict:
        mc = self.full_config
        return super().info() | {
            "tp_size": self.tp_size,
            "q_heads": mc.num_q_heads,
            "kv_heads": mc.num_kv_heads,
            "kv_heads_per_rank": self.model_config.num_kv_heads,
        }
