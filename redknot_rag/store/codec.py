"""Block codecs: how one (layer, kv_head) block's K and V become bytes, and back.

A block holds tokens `[token_start, token_start + num_tokens)` of its chunk (a local head keeps only
the chunk's tail window). Three codecs, recorded per block (docs/kv-format.md):

    RAW   K `[n, D]` then V `[n, D]`, in the storage dtype. Exact.
    INT8  K scales f32 `[D]` (per channel), V scales f32 `[n]` (per token), K int8 `[n, D]`,
          V int8 `[n, D]`. Symmetric, round-to-nearest: x = q · s with s = absmax(group) / 127.
    INT4  (KIVI-style) asymmetric, round-to-nearest, 4 bits: x = q · s + m, q in [0, 15].
          K per channel over groups of 32 tokens, V per token over groups of 32 channels
          (G = ceil(n / 32) token groups, D a multiple of 32), laid out as
          K scales f16 `[G, D]`, K mins f16 `[G, D]`, V scales f16 `[n, D/32]`,
          V mins f16 `[n, D/32]`, K nibbles u8 `[n, D/2]`, V nibbles u8 `[n, D/2]`
          (two channels per byte, the even channel in the low nibble).
          m = min(group) rounded to f16 toward -inf, s = (max(group) - m) / 15 rounded to f16
          toward +inf, so every x of the group has 0 <= (x - m) / s <= 15 (+ f32 rounding).
          A block with a value beyond f16's range (|x| > 65504, or not finite) or whose D is not
          a multiple of 32 cannot be INT4: `encode_block` raises `CodecUnsupportedError` and the
          store writes that block as INT8.

Invariant (INT8 and INT4 error bound): for every element, |decode(encode(x)) - x| <= s/2 +
|x̂|·2^-(p+1) (+ f32 rounding), where s is the element's group scale (as stored), x̂ the dequantized
value and p the storage dtype's mantissa bits (the second term is the final rounding to that dtype;
0 for float32). A group of equal values (s = 0 for INT4 when its value fits f16) decodes exactly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from redknot_rag.store.fingerprint import dtype_from_name

_F32 = 4
_F16 = 2
INT4_GROUP = 32  # tokens per K scale group, channels per V scale group

Payload = bytes | bytearray | memoryview  # one encoded block (a memoryview: a slice of a larger read buffer)


class Codec(enum.IntEnum):
    RAW = 0
    INT8 = 1
    INT4 = 2

    @classmethod
    def parse(cls, name: str) -> Codec:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown KV block codec {name!r}; supported: raw, int8, int4") from None


CODEC_NAMES = tuple(c.name.lower() for c in Codec)  # CLI choices


class CodecUnsupportedError(ValueError):
    """This block cannot be encoded with this codec (INT4: head_dim not a multiple of 32, or a scale
    or minimum outside float16's range); the store encodes it as INT8 instead."""


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
    """Encoded size of a block: RAW 2·n·D·elem; INT8 4·D + 4·n + 2·n·D;
    INT4 4·G·D + 4·n·D/32 + n·D with G = ceil(n / 32)."""
    n, d = meta.num_tokens, head_dim
    if meta.codec == Codec.RAW:
        return 2 * n * d * dtype.itemsize
    if meta.codec == Codec.INT4:
        return int4_nbytes(n, d)
    return _F32 * d + _F32 * n + 2 * n * d


def int4_nbytes(n: int, d: int) -> int:
    """INT4 payload size of `n` tokens of head_dim `d` (scales and mins f16, then the nibbles)."""
    g = -(-n // INT4_GROUP)
    return 2 * _F16 * g * d + 2 * _F16 * n * (d // INT4_GROUP) + n * d


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


def _f16_directed(x: torch.Tensor, up: bool) -> torch.Tensor:
    """f32 -> f16 rounded toward +inf (`up`) or -inf: the f16 value on that side of x (inf past the range)."""
    h = x.to(torch.float16)  # round to nearest
    wrong = h.float() < x if up else h.float() > x
    toward = torch.full_like(h, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(h, toward), h)


def quantize4(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit over the last dim: g `[..., m]` f32 -> (q u8 `[..., m]` in [0, 15], scale f16
    `[...]`, min f16 `[...]`). min is rounded down and scale up (f16), so (x - min) / scale is in
    [0, 15] up to f32 rounding; scale 0 (a group of one f16 value) gives q = 0, exact."""
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    m16 = _f16_directed(lo, up=False)
    s16 = _f16_directed((hi - m16.float()) / 15.0, up=True)
    if not (torch.isfinite(m16).all() and torch.isfinite(s16).all()):
        raise CodecUnsupportedError("a 4-bit scale or minimum is outside float16's range")
    m, s = m16.float().unsqueeze(-1), s16.float().unsqueeze(-1)
    q = torch.round((g - m) / torch.where(s > 0, s, torch.ones_like(s))).clamp_(0, 15)
    return q.to(torch.uint8), s16, m16


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """u8 `[n, D]` in [0, 15] -> `[n, D/2]`: channel 2j in the low nibble, 2j+1 in the high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack4(p: torch.Tensor) -> torch.Tensor:
    """u8 `[..., D/2]` -> f32 `[..., D]` (inverse of `_pack4`, as floats: what the decode multiplies)."""
    out = torch.empty(*p.shape[:-1], 2 * p.shape[-1])
    out[..., 0::2] = p & 15
    out[..., 1::2] = p >> 4
    return out


def encode_int4(k: torch.Tensor, v: torch.Tensor) -> bytes:
    """K, V `[n, D]` -> INT4 payload (layout in the module docstring). Raises CodecUnsupportedError."""
    n, d = k.shape
    if d % INT4_GROUP:
        raise CodecUnsupportedError(f"int4 needs head_dim a multiple of {INT4_GROUP}, got {d}")
    kf, vf = k.float(), v.float()
    f16_max = torch.finfo(torch.float16).max
    if not (kf.abs().amax() <= f16_max and vf.abs().amax() <= f16_max):  # NaN fails too
        raise CodecUnsupportedError(f"int4 needs K and V within float16's range (|x| <= {f16_max:g})")
    G = -(-n // INT4_GROUP)
    # K per (token group, channel): the last group is padded with copies of token n-1, which is in
    # that group (min and max unchanged); the padding rows are cut off after quantizing
    idx = torch.arange(G * INT4_GROUP).clamp_(max=n - 1)
    kg = kf[idx].view(G, INT4_GROUP, d).transpose(1, 2)  # [G, D, 32]
    kq, ks, km = quantize4(kg)
    kq = kq.transpose(1, 2).reshape(G * INT4_GROUP, d)[:n]  # [n, D]
    vq, vs, vm = quantize4(vf.reshape(n, d // INT4_GROUP, INT4_GROUP))  # per (token, channel group)
    vq = vq.view(n, d)
    return b"".join(_bytes(t) for t in (ks, km, vs, vm, _pack4(kq), _pack4(vq)))


def decode_int4_batch(u8: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B INT4 payloads of `n` tokens, u8 `[B, int4_nbytes(n, d)]` -> K, V f32 `[B, n, D]`:
    x̂ = q · s + m in f32 (q · s is exact: 4 bits times an f16, so one rounding, fused or not).
    One set of tensor ops for the batch (plus one per 32-token K group), elementwise, so a block
    decodes to the same bits alone or in any batch."""
    B, G, c = u8.shape[0], -(-n // INT4_GROUP), d // INT4_GROUP
    sizes = [2 * G * d, 2 * G * d, 2 * n * c, 2 * n * c, n * d // 2, n * d // 2]
    ks, km, vs, vm, kp, vp = torch.split(u8, sizes, dim=1)
    ks, km = ks.view(torch.float16).view(B, G, 1, d).float(), km.view(torch.float16).view(B, G, 1, d).float()
    vs, vm = vs.view(torch.float16).view(B, n, c, 1).float(), vm.view(torch.float16).view(B, n, c, 1).float()
    kq = _unpack4(kp.reshape(B, n, d // 2))  # [B, n, D]
    vq = _unpack4(vp.reshape(B, n, d // 2)).view(B, n, c, INT4_GROUP)
    k = torch.empty(B, n, d)
    for g in range(G):  # token group g: its K scales and mins [B, 1, D] broadcast over its tokens
        rows = slice(g * INT4_GROUP, min(n, (g + 1) * INT4_GROUP))
        torch.addcmul(km[:, g], kq[:, rows], ks[:, g], out=k[:, rows])
    v = torch.addcmul(vm, vq, vs).view(B, n, d)
    return k, v


def encode_block(k: torch.Tensor, v: torch.Tensor, codec: Codec) -> bytes:
    """K, V `[n, D]` (CPU; the storage dtype for RAW, any float dtype to quantize) -> payload bytes.
    INT4 raises `CodecUnsupportedError` for a block it cannot encode (the caller falls back to INT8)."""
    if codec == Codec.RAW:
        return _bytes(k) + _bytes(v)
    if codec == Codec.INT4:
        return encode_int4(k, v)
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
    if meta.codec == Codec.INT4:
        k4, v4 = decode_int4_batch(torch.frombuffer(buf, dtype=torch.uint8).view(1, -1), n, d)
        return k4[0].to(dtype), v4[0].to(dtype)
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
