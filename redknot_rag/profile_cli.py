"""`redknot profile-heads`: flags of the head-profile calibration (`rag.profiling`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from redknot_rag.heads import plot_profile, shipped_profile_path
from redknot_rag.options import add_engine_args, engine_config_from_args
from redknot_rag.rag.profiling import profile_heads
from redknot_rag.runner import KVRunner


def _cmd_profile(args: argparse.Namespace) -> int:
    runner = KVRunner(engine_config_from_args(args))
    t0 = time.perf_counter()
    prof = profile_heads(runner, num_cases=args.cases, window=args.window, locality_threshold=args.threshold)
    out = Path(args.out) if args.out else shipped_profile_path(runner.name)
    prof.save(out)
    plot_profile(prof, out.with_suffix(".png"))
    print(
        f"{prof.num_global}/{prof.num_layers * prof.num_kv_heads} global heads; wrote {out} and "
        f"{out.with_suffix('.png')} in {time.perf_counter() - t0:.0f} s"
    )
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("profile-heads", help="calibrate local/global KV heads for a model")
    p.add_argument("--cases", type=int, default=48, help="calibration prompts, half per case generator (default 48)")
    p.add_argument("--window", type=int, default=64, help="recent-window tokens a local head keeps (default 64)")
    p.add_argument("--threshold", type=float, default=0.8, help="locality above which a head is local (default 0.8)")
    p.add_argument("--out", default=None, help="profile path (default: the package's profiles/ folder)")
    add_engine_args(p)
    p.set_defaults(func=_cmd_profile)
