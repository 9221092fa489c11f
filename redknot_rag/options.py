"""Command-line options shared by every subcommand that loads a model (no imports of the commands)."""

from __future__ import annotations

import argparse
from pathlib import Path

from redknot_rag.config import EngineConfig
from redknot_rag.limits import MAX_DOCUMENT_TOKENS
from redknot_rag.rag.factory import DEFAULT_DATA_DIR, ServiceSettings


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every subcommand's `--help` formatter: an option's default once, after its help, unless the help
    already tells it or there is none to tell (None, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, []) or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-path",
        default=None,
        help="HF directory, .gguf, or packaged: smollm2-135m (default; 4-bit Q4_1 GGUF weights, dequantized "
        "at load), gemma3-270m, tiny-gqa (random, 2 KV heads)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--attention-backend", default="auto", help="torch, flashinfer, triton or auto")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--cpu-kv-gib", type=float, default=1.0, help="KV pool size on CPU")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="share of free GPU memory for the KV pool")
    p.add_argument(
        "--pool-local-heads",
        default="auto",
        choices=["auto", "profile", "architecture", "off"],
        help="per-head windows in the KV pool: local heads keep sink + window, their other pages are released. "
        "auto (default): the model's own sliding-window layers (Gemma-3; exact); profile: also a head profile's "
        "local heads (changes logits; bench/pool/ measures it); off: every head keeps every token",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model_path=args.model_path,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        page_size=args.page_size,
        cpu_kv_gib=args.cpu_kv_gib,
        mem_fraction=args.mem_fraction,
        pool_local_heads=getattr(args, "pool_local_heads", "auto"),
    )


def service_settings_from_args(
    args: argparse.Namespace, reuse_policy: str | None = None, *, threaded: bool = True
) -> ServiceSettings:
    """`rag.factory.ServiceSettings` from the flags; the store's `--store-*` flags where the command has
    them, else the store defaults `ingest` and `serve` use (`query`, `demo`, `docs`)."""
    from redknot_rag.store.store_config import add_store_args, store_config_from_args

    defaults = argparse.ArgumentParser(add_help=False)
    add_store_args(defaults)
    flags = argparse.Namespace(**{**vars(defaults.parse_args([])), **vars(args)})
    from_profile = flags.store_local_heads == "profile"  # resolved by build_service once the model is known
    store = store_config_from_args(argparse.Namespace(**{**vars(flags), "store_local_heads": "off"}))
    return ServiceSettings(
        engine=engine_config_from_args(args),
        data_dir=Path(args.data_dir) if getattr(args, "data_dir", None) else DEFAULT_DATA_DIR,
        reuse_policy=reuse_policy,
        store=store,
        local_heads_from_profile=from_profile,
        chunk_tokens=getattr(args, "chunk_tokens", None) or 256,
        max_document_tokens=getattr(args, "max_document_tokens", None) or MAX_DOCUMENT_TOKENS,
        threaded=threaded,
    )
