"""Chunk KV store: head-decomposed, fingerprinted, checksummed, crash-safe, tiered, prefetching.

`ChunkKVStore` is the entry point; the storage format is specified in docs/kv-format.md.
"""

from redknot_rag.store.blockfile import (
    ChunkHeader,
    CorruptChunkError,
    FingerprintMismatchError,
    UnsupportedFormatError,
)
from redknot_rag.store.chunk_store import ChunkKV, ChunkKVStore
from redknot_rag.store.codec import BlockMeta, ChunkMeta, ChunkShape, Codec, HeadClass
from redknot_rag.store.disk import DiskTier
from redknot_rag.store.fingerprint import FORMAT_VERSION, KVFingerprint, hash_token_ids, sha256_hex
from redknot_rag.store.prefetch import Prefetch
from redknot_rag.store.stats import StoreStats, TierStats
from redknot_rag.store.store_config import HeadCompression, StoreConfig, add_store_args, store_config_from_args
from redknot_rag.store.tiers import (
    BlockKey,
    BlockTier,
    ColdTier,
    EncodedBlock,
    KVBlock,
    MemoryTier,
    TierUnavailableError,
)

__all__ = [
    "FORMAT_VERSION",
    "BlockKey",
    "BlockMeta",
    "BlockTier",
    "ChunkHeader",
    "ChunkKV",
    "ChunkKVStore",
    "ChunkMeta",
    "ChunkShape",
    "Codec",
    "ColdTier",
    "CorruptChunkError",
    "DiskTier",
    "EncodedBlock",
    "FingerprintMismatchError",
    "HeadClass",
    "HeadCompression",
    "KVBlock",
    "KVFingerprint",
    "MemoryTier",
    "Prefetch",
    "StoreConfig",
    "StoreStats",
    "TierStats",
    "TierUnavailableError",
    "UnsupportedFormatError",
    "add_store_args",
    "hash_token_ids",
    "sha256_hex",
    "store_config_from_args",
]
