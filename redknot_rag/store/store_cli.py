"""`redknot store stats --data-dir D`: bytes per tier and head class, hit rates, from what is on disk.

Disk figures come from scanning the chunk files' headers; hit rates and host-tier figures come from
`stats.json`, which a serving process writes next to its chunk files at most every 10 s and on close.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from redknot_rag.store.blockfile import CorruptChunkError, read_header
from redknot_rag.store.codec import CODEC_NAMES
from redknot_rag.store.disk import old_format_dirs
from redknot_rag.store.fingerprint import FORMAT_VERSION


def _kv_root(data_dir: Path) -> Path:
    """The store root: `D/kv` (what the RAG service uses) or D itself."""
    return data_dir / "kv" if (data_dir / "kv").is_dir() else data_dir


def scan_namespace(ns: Path) -> dict[str, Any]:
    """Bytes, chunks, tokens, blocks per head class and codec of one fingerprint namespace."""
    chunks = tokens = disk_bytes = bad = 0
    by_class: dict[str, dict[str, int]] = {}
    by_codec: dict[str, int] = {}
    dense: dict[str, int] = {}
    for sub in sorted((ns / "chunks").glob("*")):
        for path in sorted(sub.glob("*.rkv")):
            fd = os.open(path, os.O_RDONLY)
            try:
                hdr = read_header(fd)
                size = os.fstat(fd).st_size
            except (CorruptChunkError, OSError):
                bad += 1
                continue
            finally:
                os.close(fd)
            m = hdr.meta
            chunks += 1
            tokens += m.num_tokens
            disk_bytes += size
            dense[m.dtype] = dense.get(m.dtype, 0) + 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.num_tokens
            for bm, n in zip(m.blocks, hdr.nbytes, strict=True):
                c = by_class.setdefault(bm.head_class.label, {"blocks": 0, "bytes": 0, "tokens": 0})
                c["blocks"] += 1
                c["bytes"] += n
                c["tokens"] += bm.num_tokens
                by_codec[bm.codec.name.lower()] = by_codec.get(bm.codec.name.lower(), 0) + n
    counters: dict[str, Any] = {}
    if (ns / "stats.json").is_file():
        counters = json.loads((ns / "stats.json").read_text())
    fp_path = ns / "fingerprint.json"
    fingerprint = json.loads(fp_path.read_text()) if fp_path.is_file() else {}
    return {
        "namespace": ns.name,
        "fingerprint": {k: fingerprint[k] for k in ("digest", "dtype") if k in fingerprint},
        "chunks": chunks,
        "tokens": tokens,
        "disk_bytes": disk_bytes,
        "disk_bytes_per_token": round(disk_bytes / tokens, 1) if tokens else 0.0,
        "dense_elements_per_token": {d: n // tokens for d, n in dense.items()} if tokens else {},
        "by_class": by_class,
        "by_codec": by_codec,
        "unreadable_files": bad,
        "quarantined_files": sum(1 for _ in (ns / "quarantine").glob("*.rkv")),
        "counters": counters,
    }


def _redis_namespace(url: str, ns_name: str, prefix: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    base = f"{prefix}:v{FORMAT_VERSION}:{ns_name.split('-', 1)[1]}"
    try:
        keys = list(client.scan_iter(match=f"{base}:*"))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        sizes = pipe.execute() if keys else []
        return {
            "redis_chunks": sum(1 for k in keys if k.endswith(b":m")),
            "redis_bytes": int(sum(sizes)),
            "redis_used_memory": int(client.info("memory")["used_memory"]),
        }
    except Exception as e:  # noqa: BLE001 - a stats command reports, it does not fail on Redis
        return {"redis_error": f"{type(e).__name__}: {e}"}


def store_stats(data_dir: Path, redis_url: str | None = None, prefix: str = "rkv") -> dict[str, Any]:
    root = _kv_root(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no KV store under {data_dir}")
    spaces = sorted(p for p in root.glob(f"v{FORMAT_VERSION}-*") if p.is_dir())
    out = []
    for ns in spaces:
        row = scan_namespace(ns)
        if redis_url:
            row.update(_redis_namespace(redis_url, ns.name, prefix))
        out.append(row)
    return {
        "root": str(root),
        "format_version": FORMAT_VERSION,
        "namespaces": out,
        "old_format_dirs": [p.name for p in old_format_dirs(root)],
    }


def _print_human(s: dict[str, Any]) -> None:
    print(f"KV store {s['root']} (format v{s['format_version']})")
    for old in s["old_format_dirs"]:
        print(f"  {old}: older format, not read (re-ingest, then delete it)")
    for ns in s["namespaces"]:
        print(f"  {ns['namespace']}: {ns['chunks']} chunks, {ns['tokens']} tokens")
        print(f"    disk   {ns['disk_bytes']:>14,d} B  ({ns['disk_bytes_per_token']:,.1f} B/token)")
        if "redis_bytes" in ns:
            print(f"    redis  {ns['redis_bytes']:>14,d} B  ({ns['redis_chunks']} chunks)")
        elif "redis_error" in ns:
            print(f"    redis  unreachable: {ns['redis_error']}")
        for cls, c in sorted(ns["by_class"].items()):
            print(f"    {cls:<12} {c['blocks']:>8d} blocks {c['bytes']:>14,d} B {c['tokens']:>12,d} block-tokens")
        c = ns["counters"]
        if c:
            tiers = [t for t in ("host", "disk", "redis") if f"{t}_bytes" in c]
            print("    " + "  ".join(f"{t} {c[f'{t}_bytes']:,.0f} B hit {c[f'{t}_hit_rate']:.1%}" for t in tiers))
            print(
                f"    block lookups {c['block_lookups']:,.0f}, misses {c['block_misses']:,.0f}, corrupt "
                f"{c['corrupt']:,.0f}, tier errors {c['tier_errors']:,.0f}"
            )


def _cmd_stats(args: argparse.Namespace) -> int:
    s = store_stats(Path(args.data_dir), args.redis_url)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        _print_human(s)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from redknot_rag.store.migrate import migrate_v1
    from redknot_rag.store.store_config import StoreConfig

    root = _kv_root(Path(args.data_dir))
    old = [p for p in old_format_dirs(root) if p.name.startswith("v1-")]
    if not old:
        print(f"no format-v1 store under {root}")
        return 0
    cfg = StoreConfig(dtype=args.store_dtype, cold_codec=args.store_cold_codec)
    for ns in old:
        r = migrate_v1(ns, root, cfg, delete_old=args.delete_old)
        print(json.dumps(r.__dict__))
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("store", help="chunk KV store tools")
    ssub = p.add_subparsers(dest="store_command", required=True)
    s = ssub.add_parser("stats", help="bytes per tier and head class, hit rates")
    s.add_argument("--data-dir", required=True, help="RAG data dir (its kv/ store) or a store root")
    s.add_argument("--redis-url", default=os.environ.get("REDKNOT_REDIS_URL"), help="also count the Redis tier")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_stats)
    m = ssub.add_parser("migrate", help="rewrite a format-v1 store in the current format")
    m.add_argument("--data-dir", required=True, help="RAG data dir (its kv/ store) or a store root")
    m.add_argument(
        "--store-dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="storage dtype (default: the dtype the KV was computed in, lossless)",
    )
    m.add_argument("--store-cold-codec", choices=list(CODEC_NAMES), default="raw")
    m.add_argument("--delete-old", action="store_true", help="remove each v1 file once it is migrated")
    m.set_defaults(func=_cmd_migrate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redknot")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["store", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)
