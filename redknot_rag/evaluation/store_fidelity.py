"""Fidelity per chunk-KV storage setting (`redknot eval --store-setting`, `--store-report`).

Settings, each on the model's dtype:
- `dense`: every token of every head (what `redknot eval` stores without the option);
- `window`: heads the model's head profile marks local keep only each chunk's tail window (a head reads
  no more than that at query time);
- `int8-window`: `window` with the int8 cold codec (per-channel K, per-token V scales) and a host tier of
  0 bytes, so every block attention sees was read from disk and decoded: the int8 path itself;
- `int4`: every token of every head with the int4 cold codec (KIVI-style: K per channel over 32-token
  groups, V per token over 32-channel groups) and a host tier of 0 bytes (read back decoded);
- `int4-window`: `window` with the int4 cold codec, host tier 0 bytes.

Each setting's records go to their own file (`records_<tag>-<suffix>.jsonl`); the report pairs every
policy's answers under a compressed setting with the SAME policy's answers on dense storage, case by
case, and puts the bytes per stored token (measured from the store's disk tier) next to them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redknot_rag.store.store_config import HeadCompression, StoreConfig

# setting -> suffix of its file tag (records_<tag>-<suffix>.jsonl, results_<tag>-<suffix>.json)
STORE_SETTINGS = {
    "dense": "dense",
    "window": "window",
    "int8-window": "int8w",
    "int4": "int4",
    "int4-window": "int4w",
}
MAX_BYTES_RATIO = 0.35  # the storage issue's goal: at most 0.35x dense model-dtype bytes...
MAX_ACCURACY_LOSS = 0.01  # ...at accuracy within 1 point of uncompressed storage


def store_config_for(setting: str, runner: Any, profile: Any) -> StoreConfig:
    """The StoreConfig of a named setting for `runner`'s model; `profile` (a heads.HeadProfile) gives the
    local heads and their window (needed by the `window` settings)."""
    if setting not in STORE_SETTINGS:
        raise ValueError(f"unknown store setting {setting!r}; known: {', '.join(STORE_SETTINGS)}")
    dtype = str(runner.dtype).replace("torch.", "")
    if setting == "dense":
        return StoreConfig(dtype=dtype)
    if setting == "int4":  # host tier 0 bytes: every block attention reads was decoded from disk
        return StoreConfig(dtype=dtype, cold_codec="int4", host_bytes=0)
    if profile is None:
        raise ValueError(f"store setting {setting!r} needs a head profile for {runner.name} (redknot profile-heads)")
    heads = HeadCompression.from_profile(profile)
    if setting == "window":
        return StoreConfig(dtype=dtype, heads=heads)
    codec = "int8" if setting == "int8-window" else "int4"
    return StoreConfig(dtype=dtype, cold_codec=codec, heads=heads, host_bytes=0)


def dense_bytes_per_token(runner: Any) -> int:
    """K and V of every layer and KV head in the model's dtype: what dense storage holds per token."""
    mc = runner.model_config
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * runner.dtype.itemsize


def store_footprint(store: Any, runner: Any) -> dict | None:
    """Bytes per stored token measured from the store's disk tier (files, headers included), against dense
    model-dtype storage; None when the store holds no chunk or its first cold tier is not a disk."""
    from redknot_rag.store.disk import DiskTier

    if not isinstance(store.cold, DiskTier):
        return None
    metas = [m for m in (store.meta(k) for k in store.keys()) if m is not None]
    tokens = sum(m.num_tokens for m in metas)
    if not tokens:
        return None
    cfg = store.config
    dense = dense_bytes_per_token(runner)
    per_token = store.cold.nbytes / tokens
    return {
        "dtype": str(store.dtype).replace("torch.", ""),
        "cold_codec": cfg.cold_codec,
        "local_heads_window": None if cfg.heads is None else cfg.heads.window,
        "num_local_heads": 0 if cfg.heads is None else cfg.heads.num_local,
        "host_bytes": cfg.host_bytes,
        "num_chunks": len(metas),
        "tokens": tokens,
        "disk_bytes": store.cold.nbytes,
        "bytes_per_token": per_token,
        "dense_bytes_per_token": dense,
        "vs_dense": per_token / dense,
    }


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """records JSONL -> {policy: {case_id: record dict}}."""
    out: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out.setdefault(d["policy"], {})[d["case_id"]] = d
    return out


def _files(out: Path, tag: str, setting: str) -> tuple[Path, Path]:
    """records and results paths of a setting; dense falls back to the plain run's files (same storage)."""
    suffix = STORE_SETTINGS[setting]
    rec, res = out / f"records_{tag}-{suffix}.jsonl", out / f"results_{tag}-{suffix}.json"
    if setting == "dense" and not rec.exists():
        rec, res = out / f"records_{tag}.jsonl", out / f"results_{tag}.json"
    return rec, res


def store_report(out: Path, tag: str, policies: Sequence[str] | None = None) -> dict:
    """Per setting and policy: accuracy, its paired difference to the same policy on dense storage (95%
    bootstrap CI, McNemar p), first-token KL and agreement@32 against that run's `full`, and the setting's
    bytes per stored token. Reads the records/results files `redknot eval --store-setting` wrote in `out`."""
    from redknot_rag.evaluation.paired_stats import compare_paired

    dense_rec, dense_res = _files(out, tag, "dense")
    if not dense_rec.exists():
        raise FileNotFoundError(f"no dense records for tag {tag!r} in {out}: run `redknot eval --store-setting dense`")
    runs = {s: _files(out, tag, s) for s in STORE_SETTINGS}
    runs = {s: f for s, f in runs.items() if f[0].exists()}
    recs = {s: _load(f[0]) for s, f in runs.items()}
    common = set.intersection(*(set(r) for r in recs.values())) - {"full"}
    names = [p for p in (policies or sorted(common)) if p in common]
    if not names:
        raise ValueError(f"no reuse policy has records under every setting found ({', '.join(runs)})")
    meta: dict = json.loads(dense_res.read_text()) if dense_res.exists() else {}
    default = meta.get("default_policy")
    if default not in names:
        default = names[0]
    dense = recs["dense"]
    settings: dict[str, dict] = {}
    for s, (rec_path, res_path) in runs.items():
        res = json.loads(res_path.read_text()) if res_path.exists() else {}
        row: dict[str, Any] = {"records": rec_path.name, "store": res.get("store"), "policies": {}}
        for p in names:
            ids = sorted(set(dense[p]) & set(recs[s][p]))
            if not ids:
                continue
            a = [bool(dense[p][i]["correct"]) for i in ids]
            b = [bool(recs[s][p][i]["correct"]) for i in ids]
            cmp = compare_paired(a, b)
            row["policies"][p] = {
                "num_cases": len(ids),
                "accuracy": cmp.accuracy_b,
                "accuracy_diff_vs_dense": cmp.accuracy_diff,
                "accuracy_diff_vs_dense_ci95": [round(cmp.ci95[0], 4), round(cmp.ci95[1], 4)],
                "mcnemar_p": cmp.mcnemar_p,
                "first_token_kl": statistics.fmean(recs[s][p][i]["first_token_kl"] for i in ids),
                "agreement_32": statistics.fmean(recs[s][p][i]["agreement_32"] for i in ids),
            }
        d = row["policies"].get(default)
        st = row["store"]
        if s != "dense" and d is not None and st is not None:
            row["default_goals"] = {
                f"bytes_at_most_{MAX_BYTES_RATIO}x_dense": st["vs_dense"] <= MAX_BYTES_RATIO,
                "accuracy_within_1_point_of_dense": d["accuracy_diff_vs_dense"] >= -MAX_ACCURACY_LOSS,
            }
        settings[s] = row
    measured = [r["store"] for r in settings.values() if r["store"] is not None]
    if settings["dense"]["store"] is None and measured:  # a plain run from before `store` was recorded
        dense_bpt = measured[0]["dense_bytes_per_token"]
        settings["dense"]["store"] = {
            "bytes_per_token": dense_bpt,
            "dense_bytes_per_token": dense_bpt,
            "vs_dense": 1.0,
            "measured": False,  # K and V of every head in the model dtype, headers not counted
        }
    return {"tag": tag, "model": meta.get("model"), "default_policy": default, "settings": settings}


def format_store_table(rep: dict) -> str:
    from redknot_rag.evaluation.paired_stats import format_diff_ci

    lines = [
        "| setting | bytes/token | x dense | policy | cases | accuracy | Δ vs same policy on dense [95% CI] | "
        "McNemar p | first-token KL | agreement@32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, row in rep["settings"].items():
        st = row["store"]
        size = f"{st['bytes_per_token']:.0f} | {st['vs_dense']:.3f}" if st else "n/a | n/a"
        for p, r in row["policies"].items():
            mark = " (default)" if p == rep["default_policy"] else ""
            diff = format_diff_ci(r["accuracy_diff_vs_dense"], r["accuracy_diff_vs_dense_ci95"])
            lines.append(
                f"| {s} | {size} | {p}{mark} | {r['num_cases']} | {r['accuracy']:.3f} | {diff} | "
                f"{r['mcnemar_p']:.3g} | {r['first_token_kl']:.3f} | {r['agreement_32']:.3f} |"
            )
    return "\n".join(lines)
