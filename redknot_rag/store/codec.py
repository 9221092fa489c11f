"""Block codecs: how one (layer, kv_head) block's K and V become bytes, and back.

A block holds tokens `[token_start, token_start + num_tokens)` of its chunk (a local head keeps only
the chunk's tail window). Two codecs, recorded per block (docs/kv-format.md):

    RAW   K `[n, D]` then V `[n, D]`, in the storage dtype. Exact.
    INT8  K scales f32 `[D]` (per channel), V scales f32 `[n]` (per token), K int8 `[n, D]`,
          V int8 `[n, D]`. Symmetric, round-to-nearest: x = q · s with s = absmax(group) / 127.

Invariant (INT8 error bound): for every element, |decode(encode(x)) - x| <= s/2 + |x̂|·2^-(p+1),
where s is the element's group scale, x̂ the dequantized value and p the storage dtype's mantissa
bits (the second term is the final rounding to that dtype; 0 for float32 up to f32 rounding).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from redknot_rag.store.fingerprint import dtype_from_name

_F32 = 4

Payload = bytes | bytearray | memoryview  # one encoded block (a memoryview: a slice of a larger read buffer)


class Codec(enum.IntEnum):
    RAW = 0
    INT8 = 1

    @classmethod
    def parse(cls, name: str) -> Codec:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown KV block codec {name!r}; supported: raw, int8") from None


class HeadClass(enum.IntEnum):
    """Why a block holds what it holds. LOCAL/GLOBAL follow heads.LOCAL (0) / heads.GLOBAL (1)."""

    LOCAL = 0  # sink + recent window suffices: only the chunk's tail window is stored
    GLOBAL = 1  # reads the whole context: every token is stored
    UNCLASSIFIED = 2  # stored without a head profile: every token

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What one stored block holds: tokens `[token_start, token_start + num_tokens)`, how encoded."""

    token_start: int
    num_tokens: int
    codec: Codec
    head_class: HeadClass

    def is_full(self, chunk_tokens: int) -> bool:
        return self.token_start == 0 and self.num_tokens == chunk_tokens


def payload_nbytes(meta: BlockMeta, head_dim: int, dtype: torch.dtype) -> int:
    """Encoded size of a block: RAW 2·n·D·elem; INT8 4·D + 4·n + 2·n·D."""
    n, d = meta.num_tokens, head_dim
    if meta.codec == Codec.RAW:
        return 2 * n * d * dtype.itemsize
    return _F32 * d + _F32 * n + 2 * n * d


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one f32 scale per slice along `dim` reduced: x `[n, D]` -> (q int8, s f32).

    dim=0 gives per-channel scales `[D]`, dim=1 per-token scales `[n]`.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=dim, keepdim=True)  # [1, D] or [n, 1]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.reshape(-1)


def encode_block(k: torch.Tensor, v: torch.Tensor, codec: Codec) -> bytes:
    """K, V `[n, D]` (CPU, storage dtype) -> payload bytes."""
    if codec == Codec.RAW:
        return _bytes(k) + _bytes(v)
    kq, ks = quantize(k, dim=0)  # per channel: K has outlier channels
    vq, vs = quantize(v, dim=1)  # per token
    return _bytes(ks) + _bytes(vs) + _bytes(kq) + _bytes(vq)


def decode_block(
    payload: Payload, meta: BlockMeta, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Payload -> K, V `[n, D]` in `dtype` on CPU. The caller verified the payload's checksum."""
    n, d = meta.num_tokens, head_dim
    if len(payload) != payload_nbytes(meta, d, dtype):
        raise ValueError(f"block payload is {len(payload)} bytes, expected {payload_nbytes(meta, d, dtype)}")
    writable = isinstance(payload, bytearray) or (isinstance(payload, memoryview) and not payload.readonly)
    buf = payload if writable else bytearray(payload)  # writable: frombuffer warns otherwise
    if meta.codec == Codec.RAW:
        kv = torch.frombuffer(buf, dtype=dtype).view(2, n, d)  # [2, n, D]: K then V
        return kv[0], kv[1]
    ks = torch.frombuffer(buf, dtype=torch.float32, count=d)  # [D]
    vs = torch.frombuffer(buf, dtype=torch.float32, count=n, offset=_F32 * d)  # [n]
    q = torch.frombuffer(buf, dtype=torch.int8, offset=_F32 * (d + n)).view(2, n, d)  # [2, n, D]
    k = (q[0].float() * ks.view(1, d)).to(dtype)
    v = (q[1].float() * vs.view(n, 1)).to(dtype)
    return k, v


def roundtrip(k: torch.Tensor, v: torch.Tensor, meta: BlockMeta, dtype_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a reader of an encoded block gets back (identity for RAW)."""
    if meta.codec == Codec.RAW:
        return k, v
    return decode_block(encode_block(k, v, meta.codec), meta, k.shape[-1], dtype_from_name(dtype_name))


@dataclass(frozen=True)
class ChunkShape:
    num_layers: int
    num_kv_heads: int
    num_tokens: int
    head_dim: int
    dtype: str


@dataclass(frozen=True)
class ChunkMeta:
    """A stored chunk's geometry, storage dtype and per-block metadata (row b = layer·H + head)."""

    chunk_key: str
    num_layers: int
    num_kv_heads: int
    num_tokens: int
    head_dim: int
    dtype: str
    blocks: tuple[BlockMeta, ...]

    def __post_init__(self) -> None:
        if len(self.blocks) != self.num_layers * self.num_kv_heads:
            raise ValueError(f"{len(self.blocks)} block metas for {self.num_layers}x{self.num_kv_heads} blocks")

    @property
    def shape(self) -> ChunkShape:
        return ChunkShape(self.num_layers, self.num_kv_heads, self.num_tokens, self.head_dim, self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def index(self, layer: int, head: int) -> int:
        if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
            raise IndexError(f"block ({layer}, {head}) outside [{self.num_layers}, {self.num_kv_heads}]")
        return layer * self.num_kv_heads + head

    def block(self, layer: int, head: int) -> BlockMeta:
        return self.blocks[self.index(layer, head)]

    def payload_nbytes(self, layer: int, head: int) -> int:
        return payload_nbytes(self.block(layer, head), self.head_dim, self.torch_dtype)

    def every_block(self) -> list[tuple[int, int]]:
        return [(layer, head) for layer in range(self.num_layers) for head in range(self.num_kv_heads)]
