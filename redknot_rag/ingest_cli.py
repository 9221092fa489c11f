"""`redknot ingest PATH...` and `redknot docs list|show|delete`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from redknot_rag.options import HelpFormatter, service_settings_from_args
from redknot_rag.rag.factory import DEFAULT_DATA_DIR, build_service

HELP = HelpFormatter  # every subcommand shows its defaults in --help, once


def require_store(data_dir: str | Path, namespace: str) -> None:
    """Fail fast, before the model loads, when nothing was ingested into `namespace` under `data_dir`
    (and create nothing there)."""
    from redknot_rag.retrieval.docdb import DocDB

    db_path = Path(data_dir) / "docs.sqlite"
    if not db_path.is_file():
        raise FileNotFoundError(f"no documents ingested in {data_dir} yet: run `redknot ingest PATH...` first")
    with DocDB(db_path) as db:
        if not db.has_namespace(namespace):
            raise FileNotFoundError(
                f"no namespace {namespace!r} in {data_dir}: run `redknot ingest --namespace {namespace} PATH...`"
            )


def plan_files(paths: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files `redknot ingest` will parse, [(file, why it is skipped)]) under `paths`, walked as the parser
    walks them, so a user hears what is skipped before the model loads."""
    from redknot_rag.retrieval.parser import SUPPORTED_SUFFIXES

    taken: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
            suffix = f.suffix.lower()
            if suffix in SUPPORTED_SUFFIXES:
                taken.append(f)
            else:
                skipped.append((f, f"unsupported file type {suffix!r}" if suffix else "no file extension"))
    return taken, skipped


def _suffixes() -> str:
    from redknot_rag.retrieval.parser import SUPPORTED_SUFFIXES

    return " ".join(SUPPORTED_SUFFIXES)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from redknot_rag.limits import InputLimits
    from redknot_rag.retrieval.docdb import validate_namespace

    validate_namespace(args.namespace)
    for p in args.paths:
        if not str(p).strip():
            raise ValueError("empty path: give a file or directory")
        if not Path(p).exists():
            raise FileNotFoundError(f"no such file or directory: {p}")
    InputLimits(max_document_bytes=args.max_document_bytes).check_paths(args.paths)  # the server's limit too
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    taken, skipped = plan_files(args.paths)
    for f, why in skipped[:20]:
        print(f"skipped {f}: {why}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more skipped", file=sys.stderr)
    if not taken:
        raise ValueError(f"nothing to ingest: {len(skipped)} file(s) skipped, none of type {_suffixes()}")
    say(f"{len(taken)} file(s) to ingest, {len(skipped)} skipped")
    say("loading the model and the embedder...")
    rag = build_service(service_settings_from_args(args))
    say(f"parsing, chunking and embedding {', '.join(map(str, args.paths))} into namespace {args.namespace!r}...")
    bars: list = []  # created on the first KV report, when the total is known

    def progress(stage: str, chunks: int, tokens: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="tok", desc="chunk KV", disable=args.quiet, dynamic_ncols=True))
        bar = bars[0]
        bar.total = total
        bar.n = tokens
        bar.set_postfix(chunks=chunks)
        bar.refresh()

    s = rag.ingest_paths(args.paths, args.namespace, with_kv=not args.no_kv, progress=progress)
    for bar in bars:
        bar.close()
    out = {
        **s.__dict__,
        "tokens_per_s": round(s.tokens_per_s, 1),
        "kv_dtype": args.store_dtype,
        "kv_codec": args.store_cold_codec,
        "kv_bytes_per_token": round(s.kv_bytes / s.tokens, 1) if s.tokens and s.kv_bytes else 0,  # as stored
    }
    print(json.dumps(out, indent=2))
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from redknot_rag.retrieval.docdb import DocDB

    require_store(args.data_dir, args.namespace)
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
    rag = build_service(service_settings_from_args(args))
    if not rag.delete_document(args.namespace, args.doc_id):
        print(f"no document {args.doc_id!r} in namespace {args.namespace!r}", file=sys.stderr)
        return 1
    print(f"deleted {args.doc_id}")
    return 0


def register_cli(sub) -> None:
    from redknot_rag.limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_TOKENS
    from redknot_rag.options import add_engine_args
    from redknot_rag.store.store_config import add_store_args

    p = sub.add_parser(
        "ingest", help="parse, chunk, embed and index documents; precompute chunk KV", formatter_class=HELP
    )
    p.add_argument("paths", nargs="+", help=f"files or directories; files of type {_suffixes()} are read")
    p.add_argument("--namespace", default="default", help="namespace to store into (1-64 chars of [A-Za-z0-9_.-])")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="documents, index and KV store")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk")
    p.add_argument("--no-kv", action="store_true", help="index only; KV is computed on first use")
    p.add_argument(
        "--max-document-bytes",
        type=int,
        default=MAX_DOCUMENT_BYTES,
        help="larger files (or .jsonl lines) are refused, as `redknot serve` refuses them",
    )
    p.add_argument(
        "--max-document-tokens",
        type=int,
        default=MAX_DOCUMENT_TOKENS,
        help="documents of more tokens are refused before anything is written, as `redknot serve` refuses them",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_store_args(p)
    add_engine_args(p)
    p.set_defaults(func=_cmd_ingest)
    d = sub.add_parser("docs", help="list, show or delete ingested documents", formatter_class=HELP)
    d.add_argument("action", choices=["list", "show", "delete"])
    d.add_argument("doc_id", nargs="?", help="the document (show, delete)")
    d.add_argument("--namespace", default="default", help="namespace to read")
    d.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="documents, index and KV store")
    add_engine_args(d)
    d.set_defaults(func=_cmd_docs)
