"""`redknot eval`: flags of the fidelity harness (`evaluation.harness`) and the report files it writes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from redknot_rag.evaluation.harness import (
    DEFAULT_POLICIES,
    FRONTIER_BUDGETS,
    FRONTIER_FAMILIES,
    QUICK_POLICIES,
    SETS,
    STRUCTURE_ORACLES,
    eval_meta,
    format_oracle_table,
    format_table,
    frontier_policies,
    plot_frontier,
    report_from_records,
    run_eval,
)
from redknot_rag.options import service_settings_from_args
from redknot_rag.rag.factory import build_service


def _cmd_eval(args: argparse.Namespace) -> int:
    import tempfile

    from redknot_rag.evaluation.store_fidelity import STORE_SETTINGS, format_store_table, store_config_for, store_report

    out = Path(args.out)
    if args.store_report:  # no model needed: the per-setting runs' files side by side
        if not args.tag:
            raise ValueError("--store-report needs --tag (the tag the --store-setting runs used, without suffix)")
        rep = store_report(out, args.tag)
        (out / f"store_{args.tag}.json").write_text(json.dumps(rep, indent=1))
        table = format_store_table(rep)
        (out / f"store_{args.tag}.md").write_text(table + "\n")
        print(table)
        return 0
    if args.quick:
        args.cases, args.policies, args.max_new_tokens = min(args.cases, 4), ",".join(QUICK_POLICIES), 8
    families = [f for f in (args.frontier or "").split(",") if f]
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(FRONTIER_BUDGETS)
    named = args.policies or ("full,naive" if families or args.oracles else ",".join(DEFAULT_POLICIES))
    policies = tuple(
        dict.fromkeys(
            [p for p in named.split(",") if p]
            + frontier_policies(families, budgets)
            + (list(STRUCTURE_ORACLES) if args.oracles else [])
        )
    )
    args.data_dir = args.data_dir or tempfile.mkdtemp(prefix="redknot-eval-")
    setting = args.store_setting

    settings = service_settings_from_args(args, threaded=False)  # run_eval steps the engine itself
    if setting:
        settings = dataclasses.replace(
            settings, store_for_model=lambda runner, prof: store_config_for(setting, runner, prof)
        )
    rag = build_service(settings)
    out.mkdir(parents=True, exist_ok=True)
    tag = (args.tag or rag.engine.runner.name) + (f"-{STORE_SETTINGS[setting]}" if setting else "")
    if args.report_only:  # what an interrupted run measured: every case all policies answered
        meta = eval_meta(rag, args.seed, args.set, args.max_new_tokens, setting)
        res = report_from_records(out / f"records_{tag}.jsonl", policies, meta, families)
    else:
        res = run_eval(
            rag,
            policies,
            n=args.cases,
            seed=args.seed,
            set_name=args.set,
            max_new_tokens=args.max_new_tokens,
            records_path=out / f"records_{tag}.jsonl",
            store_setting=setting,
            families=families,
        )
    (out / f"results_{tag}.json").write_text(json.dumps(res, indent=1))
    plot_frontier(res, out / f"frontier_{tag}.png")
    table = format_table(res)
    (out / f"table_{tag}.md").write_text(table + "\n")
    print(table)
    if res["oracles"]:
        oracle_table = format_oracle_table(res)
        (out / f"oracles_{tag}.md").write_text(oracle_table + "\n")
        print("\noracles (bench only):\n" + oracle_table)
    ch = res["default_choice"]
    if ch["qualified"]:
        print(f"default policy by the rule: {ch['policy']}")
    else:
        print(
            f"no policy meets the default rule; closest: {ch['closest']} (misses by {100 * ch['shortfall']:.1f} points)"
        )
    if args.record_default:
        _record_default(rag, res, out / f"results_{tag}.json")
    return 0


def _record_default(rag, res: dict, results_path: Path) -> None:
    """Write the chosen default policy and its evidence into the model's head profile."""
    from redknot_rag.heads import load_profile_for, shipped_profile_path

    runner = rag.engine.runner
    prof = load_profile_for(runner.name, runner.weights_fingerprint)
    if prof is None:
        raise ValueError(f"no head profile for {runner.name}: run `redknot profile-heads` first")
    choice = res["default_choice"]
    name = choice["policy"] or choice["closest"]  # nothing qualifies: serve the closest, recorded as such
    if name is None:
        raise ValueError("no reuse policy was measured: nothing to record")
    best = res["policies"][name]
    evidence = {k: best[k] for k in ("accuracy_diff", "accuracy_diff_ci95", "first_token_kl", "agreement_32")}
    evidence.update(recompute_fraction=best["recompute_fraction"], speedup_median=best["speedup_median"])
    record = {
        "policy": name,
        "qualified": choice["qualified"],
        "rule": choice["rule"],
        "shortfall": choice["shortfall"],
        "results": str(results_path),
        "num_cases": res["num_cases"],
        **evidence,
    }
    path = shipped_profile_path(runner.name)
    dataclasses.replace(prof, reuse_default=record).save(path)
    print(
        f"recorded default policy {name} "
        f"({'qualifies' if choice['qualified'] else 'closest; none qualifies'}) in {path}"
    )


def register_cli(sub) -> None:
    from redknot_rag.evaluation.store_fidelity import STORE_SETTINGS
    from redknot_rag.options import add_engine_args

    p = sub.add_parser("eval", help="fidelity of every reuse policy against full prefill (paired, with CIs)")
    p.add_argument("--cases", type=int, default=400, help="paired cases (default 400)")
    p.add_argument("--set", default="all", choices=[*SETS, "all"], help="case generator (default all: half each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--policies",
        default=None,
        help="comma-separated; must include full (default: full,naive with --frontier/--oracles, else "
        + ",".join(DEFAULT_POLICIES)
        + ")",
    )
    p.add_argument(
        "--frontier",
        default=None,
        help="comma-separated policy families swept over --budgets: " + ", ".join(FRONTIER_FAMILIES),
    )
    p.add_argument(
        "--budgets",
        default=None,
        help="recompute budgets of --frontier (default " + ",".join(map(str, FRONTIER_BUDGETS)) + "; 0 and 1 "
        "are naive and full by construction and reported as such)",
    )
    p.add_argument(
        "--oracles",
        action="store_true",
        help="add the structure oracles (bench only): " + ", ".join(STRUCTURE_ORACLES),
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (default 32)")
    p.add_argument("--quick", action="store_true", help="4 cases, 3 policies, 8 tokens: a smoke run")
    p.add_argument("--out", default="bench/reuse", help="results folder (default bench/reuse)")
    p.add_argument("--tag", default=None, help="file name tag (default: the model name)")
    p.add_argument("--data-dir", default=None, help="store folder (default: a new temporary one)")
    p.add_argument("--record-default", action="store_true", help="write the chosen default into the head profile")
    p.add_argument("--report-only", action="store_true", help="report the records file's complete cases; run none")
    p.add_argument(
        "--store-setting",
        choices=list(STORE_SETTINGS),
        default=None,
        help="chunk KV storage: dense (model dtype, all tokens), window (local heads keep their tail window), "
        "int8-window (window + int8 on disk, read back decoded), int4 (every token, int4 on disk, read back "
        "decoded), int4-window (window + int4). Files get the tag suffix "
        + ", ".join(f"-{v}" for v in STORE_SETTINGS.values())
        + " (default: dense storage, plain tag)",
    )
    p.add_argument(
        "--store-report",
        action="store_true",
        help="compare the --store-setting runs of --tag against dense storage, policy by policy (no model run)",
    )
    add_engine_args(p)
    p.set_defaults(func=_cmd_eval)
