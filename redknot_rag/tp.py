"""Tensor parallelism over KV heads: one process per device, rank 0 drives, the others follow.

Design (the simplest one that keeps the engine unchanged):

- **Shards.** Rank r of N holds q heads `[r·Hq/N, (r+1)·Hq/N)`, KV heads `[r·Hkv/N, (r+1)·Hkv/N)`
  (column-parallel q/k/v, so GQA groups never straddle ranks), intermediate columns
  `[r·I/N, (r+1)·I/N)` of gate/up, and the matching input columns of o/down (row-parallel; one
  all-reduce after each). Embedding, norms and lm_head are replicated. Each rank's `KVRunner` is an
  ordinary runner over a shard `ModelConfig` (`num_kv_heads = Hkv/N` ...), so its page pool holds
  only its own heads' pages.
- **Rank 0 drives; ranks meet at the runner seam once per step.** The engine, the HTTP server,
  retrieval and the chunk store run on rank 0 only. Its runner records page bookkeeping (the KV-memory
  API: new sequence, attach, append, copy-on-write, truncate, release, drop segment) as typed `PageOp`s
  that name sequences and segments by explicit id (`SeqKV.seq_id`, `KVSegment.segment_id`), and
  sends them in ONE `Message` (`tp_wire`; a gloo group: control on the host, data on NCCL) with the
  action that needs the followers now: a whole batch (`Forward`), a segment write, a head gather
  (`read_tokens`) or an all-rank call (`on_all_ranks`). A decode step is one message. Followers
  (`TPRunner.follow`) apply the ops and the action to their own shard.
- **Lockstep.** Every rank runs the same allocator operations in the same order on a pool of the
  same page count, so page ids, sequence slot tables and ids agree on every rank; a follower checks
  the ids and the kv length of each batch sequence and fails loudly when out of step. It keeps its
  twin of each sequence and segment until rank 0's object is garbage-collected.
- **CUDA graphs.** Decode (and small prefill) graphs are captured and replayed per rank exactly as with
  one rank: every rank runs the same batch in the same step, so the same replay decision is taken, and
  the all-reduces of the row-parallel layers are captured inside the graph. (Not measurable on the CPU
  box: the gloo test runs eagerly, as graphs exist on CUDA only.)
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
from redknot_rag.batch import ForwardBatch
from redknot_rag.config import EngineConfig, ModelConfig
from redknot_rag.kvcache import KVSegment, SeqKV
from redknot_rag.loader import LoadedModel, load_model
from redknot_rag.ports import free_port
from redknot_rag.runner import KVRunner, pick_device, pick_dtype
from redknot_rag.tp_wire import (
    Action,
    Append,
    Attach,
    DropSegment,
    Forward,
    Message,
    NewSeq,
    OnAllRanks,
    Override,
    PageOp,
    ReadTokens,
    Release,
    SliceMsg,
    Stop,
    Truncate,
    WriteSegment,
    decode,
    encode,
    pack_positions,
    segment_id_of,
    seq_id_of,
    unpack_positions,
)

log = logging.getLogger("redknot.tp")

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


class TPRunner(KVRunner):
    """A `KVRunner` over this rank's shard. On rank 0 (the driver) its page bookkeeping is recorded as
    typed `PageOp`s and sent, with the ids of dead objects, in the next `Message`, whose action is a
    whole batch (`forward`), a segment write, a gather (`read_tokens`) or an all-rank call
    (`on_all_ranks`): one control message per engine step or per segment write. Followers (`follow`)
    apply the ops and the action to their own shard. Calls inside `on_all_ranks` run on every rank
    already and are not recorded.

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
        self._depth = 0  # > 0 inside `on_all_ranks`: every rank runs the calls, nothing is recorded
        self._ops: list[PageOp] = []  # rank 0: page ops not sent yet
        self._tails: dict[int, torch.Tensor] = {}  # rank 0: seq_id -> the slots its last `append` returned
        self._seqs: dict[int, SeqKV] = {}  # followers: seq_id -> this rank's twin
        self._segments: dict[int, KVSegment] = {}  # followers: segment_id -> twin
        self._forget: tuple[list[int], list[int]] = ([], [])  # rank 0: ids whose object died (finalizers)
        self._forget_lock = threading.Lock()  # finalizers run on whichever thread collects
        self._children: list[subprocess.Popen] = []  # follower processes this rank started (`launch`)
        self._closed = False
        super().__init__(cfg, shard)
        # decode CUDA graphs stay on: every rank replays the same batch (same ops, same layout) in the
        # same step, and the all-reduces of the row-parallel layers are captured inside the graph (NCCL)
        self.model.reduce = self._reduce_sum
        if self.device.type == "cuda":  # NCCL's communicator must exist before a graph captures a collective
            dist.all_reduce(torch.zeros(1, device=self.device))

    # ---- CUDA graphs: every rank captures in the same step; all fall back together ---------------------
    def _agree(self, ok: bool) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._ctrl)
        return bool(flag.item())

    def _decode_graphs(self) -> Any:
        first = self._graphs is None
        graphs = super()._decode_graphs()
        if first and not self._agree(graphs is not None):  # a rank whose capture failed decodes eagerly:
            self._graphs, self.cuda_graphs = None, False  # so must every other (same replay decision)
            return None
        return graphs

    def _prefill_graph_runner(self) -> Any:
        first = self._prefill_graphs is None
        graphs = super()._prefill_graph_runner()
        if first and not self._agree(graphs is not None):
            self._prefill_graphs, self.prefill_graphs = None, False
            return None
        return graphs

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

    # ---- recording (rank 0) and ids ---------------------------------------------------------------
    @property
    def _records(self) -> bool:
        """Whether a call here must reach the followers: rank 0, outside `on_all_ranks`."""
        return self.tp_rank == 0 and self._depth == 0

    def _track(self, obj: SeqKV | KVSegment) -> None:
        """Followers keep the twin by id; rank 0 tells them when its object dies."""
        if isinstance(obj, SeqKV):
            if self.tp_rank:
                self._seqs[obj.seq_id] = obj
            else:
                weakref.finalize(obj, self._forget_later, 0, obj.seq_id)
        elif self.tp_rank:
            self._segments[obj.segment_id] = obj
        else:
            weakref.finalize(obj, self._forget_later, 1, obj.segment_id)

    def _forget_later(self, kind: int, i: int) -> None:
        with self._forget_lock:
            self._forget[kind].append(i)
        if kind == 0:
            self._tails.pop(i, None)

    def _send(self, action: Action) -> None:
        with self._forget_lock:
            (seqs, segments), self._forget = self._forget, ([], [])
        ops, self._ops = self._ops, []
        dist.broadcast_object_list([encode(Message(ops, seqs, segments, action))], src=0, group=self._ctrl)

    def _receive(self) -> Message:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self._ctrl)
        return decode(box[0], self._seqs, self._segments)

    # ---- the KV-memory API: local, recorded on rank 0 -----------------------------------------------
    def new_seq_kv(self) -> SeqKV:
        kv = super().new_seq_kv()
        self._track(kv)
        if self._records:
            self._ops.append(NewSeq(kv.seq_id))
        return kv

    def attach(
        self, kv: SeqKV, segment: KVSegment, positions: torch.Tensor, visible: torch.Tensor | None = None
    ) -> None:
        self.attach_many(kv, [(segment, positions, visible)])

    def attach_many(self, kv: SeqKV, items: list[tuple[KVSegment, torch.Tensor, torch.Tensor | None]]) -> None:
        if not self._records:
            super().attach_many(kv, items)
            return
        segs = []
        for seg, pos, vis in items:
            if vis is not None:  # [L, Hkv_r, T] of rank 0's heads: meaningless on another rank
                raise NotImplementedError("per-head visibility is rank-local: attach it inside runner.on_all_ranks")
            segs.append((segment_id_of(seg), pack_positions(pos)))
        super().attach_many(kv, items)
        self._ops.append(Attach(seq_id_of(kv), segs))

    def append(self, kv: SeqKV, positions: torch.Tensor) -> torch.Tensor:
        out = super().append(kv, positions)
        if self._records:
            self._ops.append(Append(seq_id_of(kv), pack_positions(positions)))
            self._tails[seq_id_of(kv)] = out  # a slice over exactly these slots crosses ranks without them
        return out

    def override(self, kv: SeqKV, token_index: torch.Tensor) -> torch.Tensor:
        out = super().override(kv, token_index)
        if self._records:
            self._ops.append(Override(seq_id_of(kv), token_index.cpu()))
        return out

    def truncate(self, kv: SeqKV, n: int) -> None:
        super().truncate(kv, n)
        if self._records:
            self._ops.append(Truncate(seq_id_of(kv), n))

    def release(self, kv: SeqKV | None) -> None:
        if kv is None:
            return
        super().release(kv)
        if self._records:
            self._ops.append(Release(seq_id_of(kv)))
            self._tails.pop(seq_id_of(kv), None)

    def _new_segment(self, num_tokens: int, visible: torch.Tensor | None) -> KVSegment:
        seg = super()._new_segment(num_tokens, visible)
        self._track(seg)
        return seg

    def allocate_segment(self, num_tokens: int, visible: torch.Tensor | None = None) -> KVSegment:
        if self._records:
            raise NotImplementedError(
                "under tensor parallelism a segment is written whole (write_segment: one message to every rank)"
            )
        return super().allocate_segment(num_tokens, visible)

    def write_segment(self, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None) -> KVSegment:
        """K/V of all heads `[L, Hkv_full, T, D]` (and `visible` `[L, Hkv_full, T]`) in; this rank keeps
        its heads `[L, Hkv/N, T, D]`. Rank 0 sends the segment to the followers in one message."""
        heads = self.kv_heads
        vis = None if visible is None else visible[:, heads]
        seg = super().write_segment(k[:, heads], v[:, heads], vis)
        if self._records:
            self._send(WriteSegment(seg.segment_id, k.cpu(), v.cpu(), None if visible is None else visible.cpu()))
        return seg

    def drop_segment(self, segment: KVSegment) -> None:
        super().drop_segment(segment)
        if self._records:
            self._ops.append(DropSegment(segment_id_of(segment)))

    def read_tokens(self, kv: SeqKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of all heads `[L, Hkv_full, T, D]` (gathered over ranks), on every rank."""
        if self._records:
            self._send(ReadTokens(seq_id_of(kv), start, end))
        k, v = super().read_tokens(kv, start, end)  # [L, Hkv/N, T, D]
        return self._gather_heads(k), self._gather_heads(v)

    def _gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=1)  # [L, Hkv_full, T, D], heads in rank order

    # ---- the step ------------------------------------------------------------------------------------
    def forward(
        self, batch: ForwardBatch, backend: AttentionBackend | None = None, num_layers: int | None = None
    ) -> torch.Tensor:
        if self._records:
            if backend is not None:
                raise NotImplementedError(
                    "a custom attention backend (probe) under tensor parallelism runs only inside runner.on_all_ranks"
                )
            self._send(self._batch_message(batch, num_layers))
        return super().forward(batch, backend, num_layers)

    def _batch_message(self, batch: ForwardBatch, num_layers: int | None) -> Forward:
        seqs = []
        for s in batch.seqs:
            if s.seq_id < 0:
                raise RuntimeError("a SeqSlice not made from a sequence of this runner cannot cross ranks")
            tail = self._tails.get(s.seq_id) is s.new_slots  # the slots just appended: no device sync
            seqs.append(SliceMsg(s.seq_id, s.q_start, s.q_len, s.num_kv, None if tail else s.new_slots.cpu()))
        return Forward(batch.input_ids.tolist(), batch.positions.tolist(), seqs, num_layers)

    def _follower_batch(self, f: Forward) -> ForwardBatch:
        slices = []
        for m in f.seqs:
            kv = self._seqs[m.seq_id]
            if kv.num_tokens != m.num_kv:
                raise RuntimeError(
                    f"tensor-parallel ranks out of step: {kv.num_tokens} kv tokens, rank 0 has {m.num_kv}"
                )
            if m.new_slots is None:  # the usual case: the slots just appended at the sequence's tail
                slots = kv.slots[:, :, m.num_kv - m.q_len : m.num_kv]
            else:
                slots = m.new_slots.to(kv.device)
            slices.append(kv.slice(m.q_start, m.q_len, slots))
        ids, pos = torch.tensor(f.input_ids, dtype=torch.int64), torch.tensor(f.positions, dtype=torch.int64)
        return ForwardBatch(ids, pos, slices, torch.zeros(0, dtype=torch.int64))

    def on_all_ranks(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn` must pickle (a module-level function or a bound method of a picklable object)."""
        if self._records:
            self._send(OnAllRanks(fn, args))
        self._depth += 1
        try:
            return fn(self, *args)
        finally:
            self._depth -= 1

    # ---- followers ---------------------------------------------------------------------------------
    def _apply(self, op: PageOp) -> None:
        """Replay one of rank 0's page ops on this rank's shard (same order, same page ids)."""
        if isinstance(op, NewSeq):
            sid = seq_id_of(self.new_seq_kv())
            if sid != op.seq_id:
                raise RuntimeError(f"tensor-parallel ranks out of step: sequence {sid}, rank 0 has {op.seq_id}")
        elif isinstance(op, Attach):
            items = [(self._segments[i], unpack_positions(p), None) for i, p in op.items]
            self.attach_many(self._seqs[op.seq_id], items)  # type: ignore[arg-type]
        elif isinstance(op, Append):
            self.append(self._seqs[op.seq_id], unpack_positions(op.positions))
        elif isinstance(op, Override):
            self.override(self._seqs[op.seq_id], op.token_index)
        elif isinstance(op, Truncate):
            self.truncate(self._seqs[op.seq_id], op.num_tokens)
        elif isinstance(op, Release):
            self.release(self._seqs[op.seq_id])
        elif isinstance(op, DropSegment):
            self.drop_segment(self._segments[op.segment_id])

    def _act(self, action: Action) -> None:
        if isinstance(action, Forward):
            self.forward(self._follower_batch(action), None, action.num_layers)
        elif isinstance(action, WriteSegment):
            seg = self.write_segment(action.k, action.v, action.visible)
            if seg.segment_id != action.segment_id:
                raise RuntimeError(
                    f"tensor-parallel ranks out of step: segment {seg.segment_id}, rank 0 has {action.segment_id}"
                )
        elif isinstance(action, ReadTokens):
            self.read_tokens(self._seqs[action.seq_id], action.start, action.end)
        elif isinstance(action, OnAllRanks):
            self.on_all_ranks(action.fn, *action.args)

    def follow(self) -> None:
        """Followers: apply rank 0's messages until it sends `Stop` (`close`)."""
        if self.tp_rank == 0:
            raise RuntimeError("rank 0 drives; only followers follow")
        while True:
            msg = self._receive()
            for op in msg.ops:
                try:
                    self._apply(op)
                except Exception:  # rank 0 met the same error in the same call (lockstep)
                    log.exception("tensor-parallel follower: %s failed", type(op).__name__)
            if isinstance(msg.action, Stop):
                return
            try:
                self._act(msg.action)
            except Exception:
                log.exception("tensor-parallel follower: %s failed", type(msg.action).__name__)
            for i in msg.forget_seqs:  # after the ops and the action: they may still have named these
                self._seqs.pop(i, None)
            for i in msg.forget_segments:
                self._segments.pop(i, None)

    def close(self) -> None:
        """Rank 0: release the followers (they return from `follow`). Idempotent."""
        if self.tp_rank == 0 and not self._closed:
            self._closed = True
            self._send(Stop())
            for p in self._children:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()

    def info(self) -> dict:
        mc = self.full_config
        return super().info() | {
            "tp_size": self.tp_size,
            "q_heads": mc.num_q_heads,
            "kv_heads": mc.num_kv_heads,
            "kv_heads_per_rank": self.model_config.num_kv_heads,
        }
