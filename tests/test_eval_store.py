"""Fidelity per storage setting (`redknot eval --store-setting`, `--store-report`) on the random tiny-gqa model
(fp32 CPU), with a head profile that marks one KV head per layer local (window 8):
- what attention reads under each setting, through the eval's own path (store.put, flush, assembler.segment):
  `window` keeps global heads bit for bit and local heads' tail window bit for bit; `int8-window` is read
  from disk (host tier 0 bytes) and differs from dense within the int8 codec's error; `int4` falls back to
  int8 on this model (head_dim 16) block by block;
- the CLI wiring: each setting's files carry its tag suffix, the plain run's files are untouched, and the
  report pairs every policy with itself on dense storage, next to measured bytes per stored token."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import alternating_profile

from redknot_rag.evaluation.store_fidelity import STORE_SETTINGS, store_config_for

WINDOW = 8
TEXT = "The Hallerby tram depot keeps its oldest car, number 31, under a blue canvas roof near gate four, locked."


@pytest.fixture(scope="module")
def tiny():
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine

    return Engine(EngineConfig(model_path="tiny-gqa", device="cpu", dtype="float32", cpu_kv_gib=0.02))


def _read_back(engine, setting, root):
    """The chunk's K, V `[L, Hkv, T, D]` and visibility as attention reads them after a flush, and the store."""
    from redknot_rag.rag.assemble import Assembler, Timing
    from redknot_rag.rag.layout import PromptLayout, chunk_key, make_fingerprint
    from redknot_rag.store import ChunkKVStore

    runner = engine.runner
    layout = PromptLayout.for_tokenizer(engine.tokenizer)
    cfg = store_config_for(setting, runner, alternating_profile(runner, WINDOW))
    store = ChunkKVStore(root, make_fingerprint(layout, runner.weights_fingerprint, runner.dtype), config=cfg)
    asm = Assembler(engine, layout, store, profile=alternating_profile(runner, WINDOW))
    try:
        ids = layout.chunk_ids(TEXT)
        k, v = asm.prefiller.prefill([ids])[0]
        store.put(chunk_key(ids), k.cpu(), v.cpu())  # as run_case ingests
        asm.flush()  # as run_case does before every policy: the segment comes from the store
        timing = Timing()
        seg = engine.run_store_work(lambda: asm.segment(ids, timing))
        assert timing.kv_miss_prefill_ms == 0
        slots = seg.slots(engine.config.page_size)  # [L, Hkv, T]
        got = (runner.pool.k_slots[slots].clone(), runner.pool.v_slots[slots].clone(), seg.visible)
        return (k.cpu(), v.cpu()), got, store
    finally:
        asm.close()


def _rel_rms(a, b):
    return ((a - b).float().pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def test_what_attention_reads_per_setting(tiny, tmp_path):
    (k0, v0), (k, v, vis), _ = _read_back(tiny, "dense", tmp_path / "dense")
    assert vis is None and torch.equal(k, k0) and torch.equal(v, v0)  # fp32 model, fp32 storage: lossless
    local = torch.tensor(alternating_profile(tiny.runner, WINDOW).classes) == 0  # [L, Hkv]
    glob = ~local

    _, (kw, vw, visw), _ = _read_back(tiny, "window", tmp_path / "window")
    assert torch.equal(kw[glob], k0[glob]) and torch.equal(vw[glob], v0[glob])  # global heads: bit for bit
    assert torch.equal(kw[local][:, -WINDOW:], k0[local][:, -WINDOW:])  # local heads: their tail window, exact
    assert torch.equal(vw[local][:, -WINDOW:], v0[local][:, -WINDOW:])
    assert visw is not None and visw[glob].all() and visw[local][:, -WINDOW:].all()
    assert not visw[local][:, :-WINDOW].any()  # ... and never read the tokens the store dropped

    _, (k8, v8, vis8), store = _read_back(tiny, "int8-window", tmp_path / "int8")
    assert vis8 is not None and torch.equal(vis8, visw)
    st = store.stats()
    assert st.tier("host").nbytes == 0 and st.tier("host").block_hits == 0  # nothing served from host memory
    assert st.tier("disk").block_hits == tiny.runner.model_config.num_layers * tiny.runner.model_config.num_kv_heads
    assert not torch.equal(k8[glob], k0[glob]) and not torch.equal(v8[glob], v0[glob])  # the int8 path is read
    for got, ref in ((k8[glob], k0[glob]), (v8[glob], v0[glob])):
        assert _rel_rms(got, ref) < 0.02  # int8 with per-channel K / per-token V scales
    assert _rel_rms(k8[local][:, -WINDOW:], k0[local][:, -WINDOW:]) < 0.02

    # int4 on tiny-gqa (head_dim 16, not a multiple of 32): every block falls back to int8, all tokens
    _, (k4, v4, vis4), store = _read_back(tiny, "int4", tmp_path / "int4")
    meta = store.meta(next(iter(store.keys())))
    assert meta is not None and {b.codec.name for b in meta.blocks} == {"INT8"}
    assert vis4 is None and store.stats().tier("host").nbytes == 0
    for got, ref in ((k4, k0), (v4, v0)):
        assert not torch.equal(got, ref) and _rel_rms(got, ref) < 0.02


def test_store_setting_cli_and_report(tiny, tmp_path, monkeypatch):
    """`--quick` per setting, then `--store-report`: files per suffix, bytes measured, paired vs dense."""
    import redknot_rag.heads as heads
    from redknot_rag.cli import main

    monkeypatch.setattr(heads, "load_profile_for", lambda name, fp: alternating_profile(tiny.runner, WINDOW))
    out = tmp_path / "out"
    common = ["eval", "--quick", "--model-path", "tiny-gqa", "--device", "cpu", "--dtype", "float32"]
    common += ["--cpu-kv-gib", "0.02", "--out", str(out), "--tag", "tiny", "--cases", "2"]
    for setting in STORE_SETTINGS:
        assert main([*common, "--store-setting", setting, "--data-dir", str(tmp_path / setting)]) == 0
    names = {p.name for p in out.iterdir()}
    for suffix in STORE_SETTINGS.values():
        assert {f"records_tiny-{suffix}.jsonl", f"results_tiny-{suffix}.json"} <= names
    assert "records_tiny.jsonl" not in names  # the plain run's files are not touched
    store = {s: json.loads((out / f"results_tiny-{x}.json").read_text())["store"] for s, x in STORE_SETTINGS.items()}
    assert abs(store["dense"]["vs_dense"] - 1) < 0.05  # disk files: K/V plus small headers
    assert store["int8-window"]["vs_dense"] < store["window"]["vs_dense"] < store["dense"]["vs_dense"]
    assert store["int8-window"]["host_bytes"] == 0 and store["int8-window"]["cold_codec"] == "int8"
    assert store["int4"]["host_bytes"] == 0 and store["int4"]["cold_codec"] == "int4"
    assert store["int4-window"]["vs_dense"] < store["int4"]["vs_dense"] < 0.6  # int8 fallback: head_dim 16

    assert main(["eval", "--store-report", "--out", str(out), "--tag", "tiny"]) == 0
    rep = json.loads((out / "store_tiny.json").read_text())
    assert set(rep["settings"]) == set(STORE_SETTINGS) and rep["default_policy"] in ("naive", "redknot:0.1")
    dense = rep["settings"]["dense"]["policies"]
    assert set(dense) == {"naive", "redknot:0.1"}
    for p in dense.values():  # dense against itself: no difference, a zero-width interval
        assert p["num_cases"] == 2 and p["accuracy_diff_vs_dense"] == 0 and p["accuracy_diff_vs_dense_ci95"] == [0, 0]
    for s in ("window", "int8-window", "int4", "int4-window"):
        row = rep["settings"][s]
        assert row["store"]["vs_dense"] < 1 and set(row["policies"]) == set(dense)
        assert set(row["default_goals"]) == {"bytes_at_most_0.35x_dense", "accuracy_within_1_point_of_dense"}
    assert "| int8-window |" in (out / "store_tiny.md").read_text()
