"""Quantized block payloads decoded where the pool is: INT8/INT4 bytes (codec.py) -> a load plan's rows.

With `StoreConfig.decode_on="device"` the host tier keeps a chunk's INT8/INT4 blocks as the cold tiers
hold them (`EncodedBlock`: ~0.1-0.3x the decoded bytes), the load copies those bytes to the device as
they are, and `DecodeLayout.rows` turns them into the rows a dense bf16 plan would have copied: per
block its n K rows then its n V rows, blocks in (layer, head) order. The scatter into the pool is the
same as for decoded blocks (`load_plan.scatter_rows`).

Torch ops, batched per (codec, token count) over every block of a layer group of every chunk of a
plan class: a few launches per group, no per-block work. Invariant: the same arithmetic as the host
decode (`codec.decode_block`, the reference), one f32 rounding per element (INT8: q·s; INT4: m + q·s
with q·s exact), then f32 -> the chunk's dtype -> the storage dtype, so rows are bit-identical to the
host-decoded ones on any device (tests/test_store_device_decode.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from redknot_rag.store.codec import INT4_GROUP, BlockMeta, Codec, HeadClass, payload_nbytes


def int8_kv(u8: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B INT8 payloads, u8 `[B, 4·d + 4·n + 2·n·d]` (contiguous) -> K, V f32 `[B, n, d]`."""
    B = u8.shape[0]
    ks = u8[:, : 4 * d].view(torch.float32)  # [B, d] per channel
    vs = u8[:, 4 * d : 4 * (d + n)].view(torch.float32)  # [B, n] per token
    q = u8[:, 4 * (d + n) :].view(torch.int8).view(B, 2, n, d)  # [B, 2, n, d]: K then V
    return q[:, 0].float() * ks[:, None, :], q[:, 1].float() * vs[:, :, None]


def int4_kv(u8: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B INT4 payloads, u8 `[B, int4_nbytes(n, d)]` (contiguous) -> K, V f32 `[B, n, d]`.

    K's token groups are broadcast over a `[B, G, 32, d]` view of the codes (the last group padded with
    zero codes, cut off after), so the decode is a fixed number of ops for any n."""
    B, G, c = u8.shape[0], -(-n // INT4_GROUP), d // INT4_GROUP
    sizes = [2 * G * d, 2 * G * d, 2 * n * c, 2 * n * c, n * d // 2, n * d // 2]
    ks, km, vs, vm, kp, vp = torch.split(u8, sizes, dim=1)
    ks, km = (t.view(torch.float16).view(B, G, 1, d).float() for t in (ks, km))  # [B, G, 1, d]
    vs, vm = (t.view(torch.float16).view(B, n, c, 1).float() for t in (vs, vm))  # [B, n, c, 1]
    kq = torch.zeros(B, G * INT4_GROUP, d, device=u8.device)  # [B, G·32, d]: codes, padded
    _unpack4_into(kp.reshape(B, n, d // 2), kq[:, :n])
    vq = torch.empty(B, n, d, device=u8.device)
    _unpack4_into(vp.reshape(B, n, d // 2), vq)
    k = torch.addcmul(km, kq.view(B, G, INT4_GROUP, d), ks).view(B, G * INT4_GROUP, d)[:, :n]  # [B, n, d]
    v = torch.addcmul(vm, vq.view(B, n, c, INT4_GROUP), vs).view(B, n, d)
    return k, v


def _unpack4_into(p: torch.Tensor, out: torch.Tensor) -> None:
    """u8 `[..., d/2]` -> `out` f32 `[..., d]`: channel 2j from the low nibble, 2j+1 from the high."""
    out[..., 0::2] = p & 15
    out[..., 1::2] = p >> 4


_DECODERS = {Codec.INT8: int8_kv, Codec.INT4: int4_kv}


@dataclass(frozen=True)
class _Group:
    """Blocks of one (codec, n) inside a layer group: `starts` `[G]` their payloads' first bytes, `k_rows`
    and `v_rows` `[G·n]` their K and V rows, relative to the layer group's first byte and row."""

    codec: Codec
    n: int
    nbytes: int
    starts: torch.Tensor
    k_rows: torch.Tensor
    v_rows: torch.Tensor


@dataclass(frozen=True)
class DecodeLayout:
    """A chunk's encoded blocks `(layer, head, codec, n)`, in (layer, head) order, payloads back to back
    (each `payload_nbytes` long, codec.py), and where they decode to: rows `[2·N, D]` of `dtype` (per
    block: n K rows then n V rows). Chunks stored alike (same heads, windows, codecs) share one (it is
    cached), so a layer group's gather indices are built once per device.

    `byte_bounds` / `row_bounds` `[L + 1]`: layer l's payload bytes and rows (layer-major invariant of
    `LoadPlan`)."""

    blocks: tuple[tuple[int, int, Codec, int], ...]
    head_dim: int
    src_dtype: torch.dtype  # the chunk's dtype: the host decode rounds to it first (codec.decode_block)
    dtype: torch.dtype  # the storage dtype: the rows' dtype
    byte_bounds: tuple[int, ...]
    row_bounds: tuple[int, ...]
    _groups: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def rows(self, staged: torch.Tensor, num_chunks: int, first: int, end: int) -> torch.Tensor:
        """Layers `[first, end)` of `num_chunks` chunks, staged chunk after chunk as uint8
        `[num_chunks · group bytes]` on the device -> their rows `[num_chunks · group rows, D]` of `dtype`,
        on the same device, chunk after chunk (what `staged.view(dtype)` gives for decoded blocks)."""
        C, d = num_chunks, self.head_dim
        nb = self.byte_bounds[end] - self.byte_bounds[first]
        nr = self.row_bounds[end] - self.row_bounds[first]
        u8 = staged.view(C, nb)  # [C, group bytes]
        out = torch.empty(C, nr, d, dtype=self.dtype, device=staged.device)  # every row is some block's
        for g in self._layer_groups(first, end, staged.device):
            G = g.starts.numel()
            # every nbytes-long slice, as a view; advanced indexing gathers from it without materializing it
            # (index_select would copy the whole overlapping view first: C · group bytes · nbytes)
            windows = u8.as_strided((C, nb - g.nbytes + 1, g.nbytes), (nb, 1, 1))
            payloads = windows[:, g.starts].reshape(C * G, g.nbytes)  # [C·G, nbytes], contiguous
            k, v = _DECODERS[g.codec](payloads, g.n, d)  # f32 [C·G, n, D]
            out.index_copy_(1, g.k_rows, k.to(self.src_dtype).to(self.dtype).reshape(C, G * g.n, d))
            out.index_copy_(1, g.v_rows, v.to(self.src_dtype).to(self.dtype).reshape(C, G * g.n, d))
        return out.view(C * nr, d)

    def _layer_groups(self, first: int, end: int, device: torch.device) -> list[_Group]:
        key = (first, end, str(device))
        if key not in self._groups:
            self._groups[key] = [
                _Group(g.codec, g.n, g.nbytes, *(t.to(device) for t in (g.starts, g.k_rows, g.v_rows)))
                for g in self._host_groups(first, end)
            ]
        return self._groups[key]

    def _host_groups(self, first: int, end: int) -> list[_Group]:
        """Group the blocks of layers `[first, end)` by (codec, n) (host int64 indices)."""
        b0, r0 = self.byte_bounds[first], self.row_bounds[first]
        at: dict[tuple[Codec, int], tuple[list[int], list[int]]] = {}
        byte, row = 0, 0
        for layer, _, codec, n in self.blocks:
            size = _nbytes(codec, n, self.head_dim, self.src_dtype)
            if first <= layer < end:
                starts = at.setdefault((codec, n), ([], []))
                starts[0].append(byte - b0)
                starts[1].append(row - r0)
            byte += size
            row += 2 * n
        out = []
        for (codec, n), (byte_starts, row_starts) in at.items():
            nbytes = _nbytes(codec, n, self.head_dim, self.src_dtype)
            ri = (torch.tensor(row_starts)[:, None] + torch.arange(n)[None, :]).reshape(-1)  # [G·n]
            out.append(_Group(codec, n, nbytes, torch.tensor(byte_starts), ri, ri + n))
        return out


def _nbytes(codec: Codec, n: int, d: int, dtype: torch.dtype) -> int:
    return payload_nbytes(BlockMeta(0, n, codec, HeadClass.UNCLASSIFIED), d, dtype)


@functools.lru_cache(maxsize=64)
def decode_layout(
    blocks: tuple[tuple[int, int, Codec, int], ...],
    num_layers: int,
    head_dim: int,
    src_dtype: torch.dtype,
    dtype: torch.dtype,
) -> DecodeLayout:
    """The layout of encoded blocks `(layer, head, codec, n)` in (layer, head) order (every codec INT8 or
    INT4) of a chunk of `num_layers` layers."""
    if any(c not in _DECODERS for _, _, c, _ in blocks):
        raise ValueError("device decode handles INT8 and INT4 blocks only")
    if list(blocks) != sorted(blocks, key=lambda b: (b[0], b[1])):
        raise ValueError("encoded blocks must be in (layer, head) order")
    nbytes = [0] * num_layers
    nrows = [0] * num_layers
    for layer, _, codec, n in blocks:
        nbytes[layer] += _nbytes(codec, n, head_dim, src_dtype)
        nrows[layer] += 2 * n
    byte_bounds, row_bounds = [0], [0]
    for layer in range(num_layers):
        byte_bounds.append(byte_bounds[-1] + nbytes[layer])
        row_bounds.append(row_bounds[-1] + nrows[layer])
    return DecodeLayout(blocks, head_dim, src_dtype, dtype, tuple(byte_bounds), tuple(row_bounds))
