"""`redknot ingest PATH...` and `redknot docs list|show|delete`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "redknot"


def open_service(args: argparse.Namespace, policy: str | None = None):
    from redknot_rag.engine import Engine
    from redknot_rag.options import engine_config_from_args
    from redknot_rag.rag import RagService

    engine = Engine(engine_config_from_args(args))
    kw: dict = {}
    if hasattr(args, "store_host_bytes"):
        import inspect

        from redknot_rag.server.cli import store_config_for

        if "store_config" in inspect.signature(RagService).parameters:
            kw["store_config"] = store_config_for(engine, args)
        else:
            print("warning: this RagService takes no store settings yet; --store-* flags ignored", file=sys.stderr)
    return RagService(engine, Path(args.data_dir), policy, **kw)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    for p in args.paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"no such file or directory: {p}")
    rag = open_service(args)
    bar = tqdm(total=0, unit="tok", desc="chunk KV", disable=args.quiet, dynamic_ncols=True)

    def progress(stage: str, chunks: int, tokens: int, total: int) -> None:
        bar.total = total
        bar.n = tokens
        bar.set_postfix(chunks=chunks)
        bar.refresh()

    s = rag.ingest_paths(args.paths, args.namespace, with_kv=not args.no_kv, progress=progress)
    bar.close()
    out = {
        **s.__dict__,
        "tokens_per_s": round(s.tokens_per_s, 1),
        "kv_bytes_per_token": round(s.kv_bytes / s.tokens, 1) if s.tokens and s.kv_bytes else 0,
    }
    print(json.dumps(out, indent=2))
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from redknot_rag.retrieval.docdb import DocDB

    db = DocDB(Path(args.data_dir) / "docs.sqlite")
    db.require_namespace(args.namespace)
    if args.action == "list":
        for d in db.list_documents(args.namespace):
            print(f"{d.doc_id}\t{len(db.chunks_for_doc(args.namespace, d.doc_id))} chunks\t{d.source_path}")
        return 0
    if not args.doc_id:
        raise ValueError(f"docs {args.action} needs a document id")
    if args.action == "show":
        row = db.get_document(args.namespace, args.doc_id)
        if row is None:
            raise KeyError(f"no document {args.doc_id!r} in namespace {args.namespace!r}")
        chunks = db.chunks_for_doc(args.namespace, args.doc_id)
        print(
            json.dumps(
                {
                    "doc_id": row.doc_id,
                    "source": row.source_path,
                    "chunks": [
                        {"chunk_id": c.chunk_id, "tokens": c.num_tokens, "kv": c.is_kv_done, "text": c.text[:80]}
                        for c in chunks
                    ],
                },
                indent=2,
            )
        )
        return 0
    rag = open_service(args)
    if not rag.delete_document(args.namespace, args.doc_id):
        print(f"no document {args.doc_id!r} in namespace {args.namespace!r}", file=sys.stderr)
        return 1
    print(f"deleted {args.doc_id}")
    return 0


def register_cli(sub) -> None:
    from redknot_rag.options import add_engine_args
    from redknot_rag.store.config import add_store_args

    p = sub.add_parser("ingest", help="parse, chunk, embed and index documents; precompute chunk KV")
    p.add_argument("paths", nargs="+", help=".txt .md .html .jsonl files or directories")
    p.add_argument("--namespace", default="default")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--no-kv", action="store_true", help="index only; KV is computed on first use")
    p.add_argument("--quiet", action="store_true")
    add_store_args(p)
    add_engine_args(p)
    p.set_defaults(func=_cmd_ingest)
    d = sub.add_parser("docs", help="list, show or delete ingested documents")
    d.add_argument("action", choices=["list", "show", "delete"])
    d.add_argument("doc_id", nargs="?")
    d.add_argument("--namespace", default="default")
    d.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    add_engine_args(d)
    d.set_defaults(func=_cmd_docs)
