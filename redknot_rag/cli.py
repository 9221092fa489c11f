"""`redknot` command line. Subcommands register themselves through `register_cli(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from redknot_rag.options import HelpFormatter, add_engine_args, engine_config_from_args

# modules that add subcommands (each has `register_cli(subparsers)`)
_COMMAND_MODULES = (
    "redknot_rag.ingest_cli",
    "redknot_rag.server.serve_cli",
    "redknot_rag.profile_cli",
    "redknot_rag.evaluation.eval_cli",
    "redknot_rag.demo",
    "redknot_rag.store.store_cli",
    "redknot_rag.cluster",
)


def _cmd_generate(args: argparse.Namespace) -> int:
    from redknot_rag.chat import chat_prompt_ids, encode
    from redknot_rag.engine import Engine
    from redknot_rag.sampling import SamplingParams

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise ValueError("empty prompt")
    SamplingParams(  # bad values fail before the model loads
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    ).validate()
    # the forward runs on the engine's own thread, as in the server: on a busy CPU, torch's OpenMP team of
    # the main thread ran the same matmuls ~1.7x slower (and the CLI ~10x slower end to end, issue 28)
    engine = Engine(engine_config_from_args(args))
    engine.start()
    tok = engine.tokenizer
    ids = encode(tok, args.prompt) if args.raw else chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    req = engine.make_request(ids, params)
    engine.submit(req)
    t0 = time.perf_counter()
    while True:
        ev = req.events.get()
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        if ev.error:
            raise RuntimeError(ev.error)
        if ev.finished:
            break
    dt = time.perf_counter() - t0
    n = len(req.output_ids)
    ttft = req.ttft or 0.0
    print(
        f"\n[{len(ids)} prompt tokens, {n} new tokens, TTFT {ttft * 1e3:.0f} ms, "
        f"{n / max(dt, 1e-9):.1f} tok/s, finish {json.dumps(req.finish_reason)}]",
        file=sys.stderr,
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from redknot_rag.engine import Engine

    engine = Engine(engine_config_from_args(args))
    print(json.dumps(engine.info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redknot", description="RedKnot-RAG: RAG serving with per-head KV reuse")
    sub = parser.add_subparsers(dest="command", required=True)
    helpful = HelpFormatter
    g = sub.add_parser("generate", help="generate text for one prompt", formatter_class=helpful)
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely tokens (-1: all)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_engine_args(g)
    g.set_defaults(func=_cmd_generate)
    i = sub.add_parser("info", help="model, device, dtype and KV pool size", formatter_class=helpful)
    add_engine_args(i)
    i.set_defaults(func=_cmd_info)
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # subcommand module not built into this install
            raise
        mod.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from redknot_rag.loader import ModelLoadError
        from redknot_rag.sampling import InvalidRequestError

        if isinstance(e, (ModelLoadError, InvalidRequestError, ValueError, FileNotFoundError, KeyError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
