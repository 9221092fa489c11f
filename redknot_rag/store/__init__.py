"""Chunk KV store: head-decomposed, fingerprinted, checksummed, crash-safe, tiered.

`ChunkKVStore` is the entry point; the on-disk format is specified in docs/kv-format.md.
"""

from redknot_rag.store.blockfile import ChunkHeader, CorruptChunkError, FingerprintMismatchError
from redknot_rag.store.chunk_store import ChunkKV, ChunkKVStore, StoreStats
from redknot_rag.store.disk import DiskTier
from redknot_rag.store.fingerprint import FORMAT_VERSION, KVFingerprint, hash_token_ids, sha256_hex
from redknot_rag.store.tiers import BlockKey, BlockTier, ChunkShape, ColdTier, KVBlock, MemoryTier

__all__ = [
    "FORMAT_VERSION",
    "BlockKey",
    "BlockTier",
    "ChunkHeader",
    "ChunkKV",
    "ChunkKVStore",
    "ChunkShape",
    "ColdTier",
    "CorruptChunkError",
    "DiskTier",
    "FingerprintMismatchError",
    "KVBlock",
    "KVFingerprint",
    "MemoryTier",
    "StoreStats",
    "hash_token_ids",
    "sha256_hex",
]
