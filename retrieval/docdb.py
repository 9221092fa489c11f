"""SQLite document database: namespaces, documents, chunks and each chunk's KV state.

- Namespaces isolate tenants: every read and write names one, and an unknown one raises
  `UnknownNamespaceError`.
- `chunks.id` (INTEGER PRIMARY KEY AUTOINCREMENT) is the chunk's vector id. AUTOINCREMENT
  means an id is never reused, so a stale vector or KV block of a deleted chunk can never be
  mistaken for a new chunk.
- Writers take `BEGIN IMMEDIATE` (the write lock up front) and wait up to `busy_timeout_s`
  for it, so processes ingesting the same corpus serialize; UNIQUE constraints make a
  duplicate document or chunk impossible even then. WAL mode lets readers run alongside.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redknot_rag.retrieval.chunker import Chunk
from redknot_rag.retrieval.parser import Document

KV_MISSING = "missing"
KV_DONE = "done"
NAMESPACE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"  # also the HTTP schema's pattern
DOC_ID_PATTERN = r"^[^\x00-\x1f\x7f]{1,512}$"  # no control characters; "." and ".." are refused too
_NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)
_DOC_ID_RE = re.compile(DOC_ID_PATTERN)
_MAX_SQL_VARS = 500
_WORD_RE = re.compile(r"\w+")
_MAX_QUERY_TERMS = 64

# chunks_fts: a full-text (FTS5, external content) index over chunk text, kept in step by triggers.
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS namespaces (
        name     TEXT PRIMARY KEY,
        created  REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS documents (
        namespace     TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        doc_id        TEXT NOT NULL,
        source_path   TEXT NOT NULL,
        content_hash  TEXT NOT NULL,
        metadata      TEXT NOT NULL DEFAULT '{}',
        created       REAL NOT NULL,
        PRIMARY KEY (namespace, doc_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS chunks (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace   TEXT NOT NULL,
        doc_id      TEXT NOT NULL,
        chunk_id    TEXT NOT NULL,
        idx         INTEGER NOT NULL,
        text        TEXT NOT NULL,
        char_start  INTEGER NOT NULL,
        char_end    INTEGER NOT NULL,
        num_tokens  INTEGER NOT NULL,
        kv_state    TEXT NOT NULL DEFAULT 'missing',
        UNIQUE (namespace, chunk_id),
        UNIQUE (namespace, doc_id, idx),
        FOREIGN KEY (namespace, doc_id) REFERENCES documents(namespace, doc_id) ON DELETE CASCADE
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS chunks_by_kv_state ON chunks(namespace, kv_state)
    """,
    """
    CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
        text, namespace UNINDEXED, content='chunks', content_rowid='id',
        tokenize='unicode61 remove_diacritics 2'
    )
    """,
    """
    CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts(rowid, text, namespace) VALUES (new.id, new.text, new.namespace);
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
        INSERT INTO chunks_fts(chunks_fts, rowid, text, namespace)
        VALUES ('delete', old.id, old.text, old.namespace);
    END
    """,
)


class UnknownNamespaceError(KeyError):
    """A namespace that was never created (or was deleted) was named. The message names only that
    namespace: it never lists the others or the database path (the server shows it to tenants)."""

    def __init__(self, namespace: str) -> None:
        super().__init__(f"unknown namespace {namespace!r}")
        self.namespace = namespace

    def __str__(self) -> str:  # KeyError would print repr(message)
        return str(self.args[0]) if self.args else ""


def validate_namespace(name: object) -> str:
    """`name` if it is a valid namespace name (1-64 chars of [A-Za-z0-9_.-], not starting with . or -)."""
    if not isinstance(name, str) or not _NAMESPACE_RE.match(name):
        raise ValueError(
            f"invalid namespace name {name!r}: use 1-64 chars of [A-Za-z0-9_.-], starting with [A-Za-z0-9_]"
        )
    return name


def validate_doc_id(doc_id: object) -> str:
    """`doc_id` if it is usable everywhere: 1-512 chars, no control characters, not "." or "..", no
    surrounding whitespace. Ids may contain "/" (the CLI uses relative paths): the HTTP API takes them
    percent-encoded in the path or as the `doc_id` query parameter."""
    if not isinstance(doc_id, str) or not _DOC_ID_RE.match(doc_id):
        raise ValueError(f"invalid doc_id {doc_id!r}: 1-512 characters, no control characters")
    if doc_id in (".", "..") or doc_id != doc_id.strip():
        raise ValueError(f"invalid doc_id {doc_id!r}: not '.' or '..', no leading or trailing whitespace")
    return doc_id


@dataclass(frozen=True)
class DocumentRow:
    namespace: str
    doc_id: str
    source_path: str
    content_hash: str
    metadata: Mapping[str, Any]
    created: float


@dataclass(frozen=True)
class ChunkRow:
    """A stored chunk. `id` is its vector id (unique across namespaces, never reused)."""

    id: int
    namespace: str
    doc_id: str
    chunk_id: str
    index: int
    text: str
    char_start: int
    char_end: int
    num_tokens: int
    kv_state: str
    kv_key: str | None = None  # content address of the chunk's prompt tokens: the key of its stored KV

    @property
    def is_kv_done(self) -> bool:
        return self.kv_state == KV_DONE


@dataclass(frozen=True)
class UpsertResult:
    """Outcome of `DocDB.upsert_document`.

    is_changed: False when the stored content hash already matched (nothing was written).
    removed_ids: row ids of the replaced chunks: drop their vectors and KV.
    added_ids: row ids of the new chunks, in chunk order: embed and prefill these.
    """

    is_changed: bool
    removed_ids: tuple[int, ...] = ()
    added_ids: tuple[int, ...] = ()


class DocDB:
    """One SQLite file; safe to share between threads of a process and between processes."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        with self._write() as cur:
            for stmt in _SCHEMA:
                cur.execute(stmt)
            cols = {r[1] for r in cur.execute("PRAGMA table_info(chunks)")}
            if "kv_key" not in cols:  # databases written before chunk rows recorded their KV key
                cur.execute("ALTER TABLE chunks ADD COLUMN kv_key TEXT")
            cur.execute("CREATE INDEX IF NOT EXISTS chunks_by_kv_key ON chunks(kv_key)")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> DocDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _require_namespace(self, cur: sqlite3.Cursor | sqlite3.Connection, namespace: str) -> None:
        if cur.execute("SELECT 1 FROM namespaces WHERE name = ?", (namespace,)).fetchone() is None:
            raise UnknownNamespaceError(namespace)

    # -- namespaces --------------------------------------------------------------------

    def create_namespace(self, name: str, exist_ok: bool = True) -> bool:
        """Create a namespace. Returns True if it was new. Names: [A-Za-z0-9_.-], <= 64 chars."""
        validate_namespace(name)
        with self._write() as cur:
            cur.execute("INSERT OR IGNORE INTO namespaces(name, created) VALUES (?, ?)", (name, time.time()))
            is_new = cur.rowcount == 1
        if not is_new and not exist_ok:
            raise ValueError(f"namespace {name!r} already exists")
        return is_new

    def list_namespaces(self) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM namespaces ORDER BY name")]

    def has_namespace(self, name: str) -> bool:
        return bool(self._read("SELECT 1 FROM namespaces WHERE name = ?", (name,)))

    def require_namespace(self, name: str) -> None:
        """Raise `UnknownNamespaceError` unless the namespace exists."""
        with self._lock:
            self._require_namespace(self._conn, name)

    def delete_namespace(self, name: str) -> list[int]:
        """Delete a namespace with all its documents. Returns the removed chunk ids."""
        with self._write() as cur:
            self._require_namespace(cur, name)
            ids = [r[0] for r in cur.execute("SELECT id FROM chunks WHERE namespace = ? ORDER BY id", (name,))]
            cur.execute("DELETE FROM chunks WHERE namespace = ?", (name,))
            cur.execute("DELETE FROM documents WHERE namespace = ?", (name,))
            cur.execute("DELETE FROM namespaces WHERE name = ?", (name,))
        return ids

    # -- documents ---------------------------------------------------------------------

    def upsert_document(self, namespace: str, doc: Document, chunks: Sequence[Chunk]) -> UpsertResult:
        """Store `doc` and its chunks. Same content hash as stored: no-op (`is_changed=False`).
        Changed: the old chunks are deleted and their ids returned in `removed_ids`."""
        validate_doc_id(doc.doc_id)
        for c in chunks:
            if c.doc_id != doc.doc_id:
                raise ValueError(f"chunk {c.chunk_id} belongs to {c.doc_id!r}, not {doc.doc_id!r}")
        with self._write() as cur:
            self._require_namespace(cur, namespace)
            row = cur.execute(
                "SELECT content_hash FROM documents WHERE namespace = ? AND doc_id = ?",
                (namespace, doc.doc_id),
            ).fetchone()
            if row is not None and row[0] == doc.content_hash:
                return UpsertResult(is_changed=False)
            removed = self._delete_chunks(cur, namespace, doc.doc_id)
            cur.execute(
                "INSERT INTO documents(namespace, doc_id, source_path, content_hash, metadata, created)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(namespace, doc_id) DO UPDATE SET"
                " source_path = excluded.source_path, content_hash = excluded.content_hash,"
                " metadata = excluded.metadata",
                (
                    namespace,
                    doc.doc_id,
                    doc.source_path,
                    doc.content_hash,
                    json.dumps(dict(doc.metadata)),
                    time.time(),
                ),
            )
            added = []
            for c in chunks:
                cur.execute(
                    "INSERT INTO chunks(namespace, doc_id, chunk_id, idx, text, char_start, char_end,"
                    " num_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        namespace,
                        c.doc_id,
                        c.chunk_id,
                        c.index,
                        c.text,
                        c.char_start,
                        c.char_end,
                        c.num_tokens,
                    ),
                )
                added.append(int(cur.lastrowid or 0))
        return UpsertResult(is_changed=True, removed_ids=tuple(removed), added_ids=tuple(added))

    def list_documents(self, namespace: str) -> list[DocumentRow]:
        with self._lock:
            self._require_namespace(self._conn, namespace)
            rows = self._conn.execute(
                "SELECT * FROM documents WHERE namespace = ? ORDER BY doc_id", (namespace,)
            ).fetchall()
        return [_document_row(r) for r in rows]

    def get_document(self, namespace: str, doc_id: str) -> DocumentRow | None:
        with self._lock:
            self._require_namespace(self._conn, namespace)
            r = self._conn.execute(
                "SELECT * FROM documents WHERE namespace = ? AND doc_id = ?", (namespace, doc_id)
            ).fetchone()
        return _document_row(r) if r is not None else None

    def delete_document(self, namespace: str, doc_id: str) -> list[int]:
        """Delete a document and its chunks. Returns the removed chunk ids ([] if absent)."""
        with self._write() as cur:
            self._require_namespace(cur, namespace)
            removed = self._delete_chunks(cur, namespace, doc_id)
            cur.execute("DELETE FROM documents WHERE namespace = ? AND doc_id = ?", (namespace, doc_id))
        return removed

    @staticmethod
    def _delete_chunks(cur: sqlite3.Cursor, namespace: str, doc_id: str) -> list[int]:
        ids = [
            int(r[0])
            for r in cur.execute(
                "SELECT id FROM chunks WHERE namespace = ? AND doc_id = ? ORDER BY id", (namespace, doc_id)
            )
        ]
        cur.execute("DELETE FROM chunks WHERE namespace = ? AND doc_id = ?", (namespace, doc_id))
        return ids

    # -- chunks ------------------------------------------------------------------------

    def chunks_for_doc(self, namespace: str, doc_id: str) -> list[ChunkRow]:
        return self._chunks("doc_id = ? ORDER BY idx", namespace, (doc_id,))

    def get_chunks(self, namespace: str, ids: Sequence[int]) -> list[ChunkRow]:
        """Chunks by row id, in the order asked; ids absent from this namespace are skipped."""
        found: dict[int, ChunkRow] = {}
        id_list = [int(i) for i in ids]
        for i in range(0, len(id_list), _MAX_SQL_VARS):
            part = id_list[i : i + _MAX_SQL_VARS]
            marks = ",".join("?" * len(part))
            for c in self._chunks(f"id IN ({marks})", namespace, part):
                found[c.id] = c
        if not id_list:
            self.require_namespace(namespace)
        return [found[i] for i in id_list if i in found]

    def get_chunk_by_chunk_id(self, namespace: str, chunk_id: str) -> ChunkRow | None:
        rows = self._chunks("chunk_id = ?", namespace, (chunk_id,))
        return rows[0] if rows else None

    def num_chunks(self, namespace: str) -> int:
        with self._lock:
            self._require_namespace(self._conn, namespace)
            return int(
                self._conn.execute("SELECT COUNT(*) FROM chunks WHERE namespace = ?", (namespace,)).fetchone()[0]
            )

    def all_chunk_ids(self, namespace: str) -> list[int]:
        return [c.id for c in self._chunks("1 ORDER BY id", namespace, ())]

    def mark_kv_done(self, chunk_row_id: int, kv_key: str | None = None) -> bool:
        """Record that the chunk's KV is stored (under `kv_key`, when given). False if no such chunk exists."""
        with self._write() as cur:
            cur.execute(
                "UPDATE chunks SET kv_state = ?, kv_key = COALESCE(?, kv_key) WHERE id = ?",
                (KV_DONE, kv_key, int(chunk_row_id)),
            )
            return cur.rowcount == 1

    def set_kv_key(self, chunk_row_id: int, kv_key: str) -> None:
        """Record the chunk's one identity for its KV (the content address of its prompt tokens)."""
        with self._write() as cur:
            cur.execute("UPDATE chunks SET kv_key = ? WHERE id = ?", (kv_key, int(chunk_row_id)))

    def kv_keys_in_use(self, keys: Sequence[str] | set[str]) -> set[str]:
        """Those of `keys` that some chunk row, in any namespace, still records: their KV must stay."""
        keys = list(keys)
        out: set[str] = set()
        for i in range(0, len(keys), _MAX_SQL_VARS):
            part = keys[i : i + _MAX_SQL_VARS]
            marks = ",".join("?" * len(part))
            out |= {r[0] for r in self._read(f"SELECT DISTINCT kv_key FROM chunks WHERE kv_key IN ({marks})", part)}
        return out

    def chunks_missing_kv(self, namespace: str) -> list[ChunkRow]:
        return self._chunks("kv_state = ? ORDER BY id", namespace, (KV_MISSING,))

    def search_text(self, namespace: str, query: str, limit: int = 20) -> list[tuple[int, float]]:
        """Lexical (BM25, FTS5) search. Returns [(chunk row id, score)], best first; higher
        scores are better. Any word of the query may match (OR), rarer words weigh more."""
        terms = list(dict.fromkeys(_WORD_RE.findall(query.lower())))[:_MAX_QUERY_TERMS]
        self.require_namespace(namespace)
        if not terms or limit <= 0:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        rows = self._read(
            "SELECT rowid, bm25(chunks_fts) AS s FROM chunks_fts"
            " WHERE chunks_fts MATCH ? AND namespace = ? ORDER BY s LIMIT ?",
            (match, namespace, int(limit)),
        )
        return [(int(r[0]), -float(r[1])) for r in rows]

    def _chunks(self, where: str, namespace: str, params: Sequence[Any]) -> list[ChunkRow]:
        with self._lock:
            self._require_namespace(self._conn, namespace)
            rows = self._conn.execute(
                f"SELECT * FROM chunks WHERE namespace = ? AND {where}", (namespace, *params)
            ).fetchall()
        return [_chunk_row(r) for r in rows]


def _document_row(r: sqlite3.Row) -> DocumentRow:
    return DocumentRow(
        namespace=r["namespace"],
        doc_id=r["doc_id"],
        source_path=r["source_path"],
        content_hash=r["content_hash"],
        metadata=json.loads(r["metadata"]),
        created=float(r["created"]),
    )


def _chunk_row(r: sqlite3.Row) -> ChunkRow:
    return ChunkRow(
        id=int(r["id"]),
        namespace=r["namespace"],
        doc_id=r["doc_id"],
        chunk_id=r["chunk_id"],
        index=int(r["idx"]),
        text=r["text"],
        char_start=int(r["char_start"]),
        char_end=int(r["char_end"]),
        num_tokens=int(r["num_tokens"]),
        kv_state=r["kv_state"],
        kv_key=r["kv_key"],
    )
