"""The command line as a new user meets it (issue 28): help that tells each default once and the file
types ingest reads; ingest that says what it skips, and why, before the model loads."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest


def _help(*cmd: str) -> str:
    r = subprocess.run([sys.executable, "-m", "redknot_rag.cli", *cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("cmd", ["serve", "ingest", "query", "generate"])
def test_help_tells_each_default_once(cmd):
    text = _help(cmd)
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for opt in options:
        flat = " ".join(opt.split())
        assert flat.count("(default:") <= 1 and "(default: None)" not in flat, flat


def test_ingest_help_lists_every_file_type_it_reads():
    from redknot_rag.retrieval.parser import SUPPORTED_SUFFIXES

    flat = " ".join(_help("ingest").split())
    assert all(s in flat for s in SUPPORTED_SUFFIXES), flat


def test_ingest_says_what_it_skips_before_loading_the_model(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "copyright").write_text("Format: machine-readable\n")
    (tmp_path / "docs" / "spec.rst").write_text("Title\n=====\n")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "redknot_rag.cli", "ingest", str(tmp_path / "docs"), "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert f"skipped {tmp_path / 'docs' / 'copyright'}: no file extension" in r.stderr
    assert f"skipped {tmp_path / 'docs' / 'spec.rst'}: unsupported file type '.rst'" in r.stderr
    assert "nothing to ingest" in r.stderr and "loading the model" not in r.stderr
    assert not (tmp_path / "d").exists() and time.perf_counter() - t0 < 60


def _record_step_threads(monkeypatch) -> set[str]:
    from redknot_rag.engine import Engine

    names: set[str] = set()
    step = Engine.step

    def recording_step(self, *a, **kw):
        names.add(threading.current_thread().name)
        return step(self, *a, **kw)

    monkeypatch.setattr(Engine, "step", recording_step)
    return names


def test_cli_generate_runs_the_forward_on_the_engine_thread_as_the_server_does(monkeypatch, capsys):
    """On a busy 2-core machine the main thread's OpenMP team ran `redknot generate` ~10x slower than the
    server's engine thread (TTFT 6.4 s against 0.3 s measured here): the CLI now steps on that thread too."""
    from redknot_rag.cli import main

    names = _record_step_threads(monkeypatch)
    assert main(["generate", "Hello", "--model-path", "tiny-gqa", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert names == {"redknot-engine"}, names
    assert "3 new tokens" in capsys.readouterr().err


def _fake_service(monkeypatch) -> dict:
    """`build_service` builds the engine as ever but hands it back instead of a RagService; `seen` gets
    the service's arguments."""
    import redknot_rag.rag.service

    seen: dict = {}

    def fake_service(engine, data_dir, policy, **kw):
        seen.update(kw, policy=policy, data_dir=data_dir)
        return engine

    monkeypatch.setattr(redknot_rag.rag.service, "RagService", fake_service)
    return seen


def test_cli_rag_commands_run_the_forward_on_the_engine_thread(monkeypatch, tmp_path):
    import argparse

    from redknot_rag.options import add_engine_args, service_settings_from_args
    from redknot_rag.rag.factory import build_service

    _fake_service(monkeypatch)
    p = argparse.ArgumentParser()
    add_engine_args(p)
    p.add_argument("--data-dir")
    args = p.parse_args(["--model-path", "tiny-gqa", "--device", "cpu", "--data-dir", str(tmp_path)])
    engine = build_service(service_settings_from_args(args))
    try:
        assert engine.is_looping
    finally:
        engine.shutdown()


def test_query_and_demo_use_the_defaults_of_ingest_and_serve(monkeypatch, tmp_path):
    """One source per default: `query` takes the server's reuse policy (None: the model's measured one),
    `query`/`demo` open the store with the `--store-*` defaults `ingest` and `serve` use (bf16, not the
    producer's fp32), and `serve`, `ingest`, `query`, `docs` share one data folder."""
    import argparse

    from redknot_rag.cli import build_parser
    from redknot_rag.options import service_settings_from_args
    from redknot_rag.rag.factory import DEFAULT_DATA_DIR, build_service
    from redknot_rag.server.serve_cli import settings_from_args

    parse = build_parser().parse_args
    assert parse(["query", "q"]).reuse_policy is None is parse(["serve"]).reuse_policy
    dirs = {str(parse(cmd).data_dir) for cmd in (["serve"], ["ingest", "x"], ["query", "q"], ["docs", "list"])}
    assert dirs == {str(DEFAULT_DATA_DIR)}, dirs
    assert settings_from_args(parse(["serve"])).data_dir == DEFAULT_DATA_DIR  # serve has the RAG routes
    ingest = parse(["ingest", "x"])
    seen = _fake_service(monkeypatch)
    demo = parse(["demo", "--model-path", "tiny-gqa", "--device", "cpu"])
    engine = build_service(service_settings_from_args(argparse.Namespace(**{**vars(demo), "data_dir": str(tmp_path)})))
    engine.shutdown()
    assert seen["store_config"].dtype == ingest.store_dtype == "bfloat16" and seen["policy"] is None


def test_a_bad_policy_name_fails_before_the_model_loads():
    from redknot_rag.rag.factory import ServiceSettings

    with pytest.raises(ValueError, match="policy"):
        ServiceSettings(reuse_policy="no-such-policy")


def test_ingest_summary_reports_the_bytes_stored(engine, tmp_path):
    """The summary's KV bytes are what the store holds (bf16 here: 2 bytes a value), not the producer's fp32."""
    from redknot_rag.rag import RagService
    from redknot_rag.store.store_config import StoreConfig

    mc = engine.model_config
    rag = RagService(engine, tmp_path / "data", "naive", store_config=StoreConfig(dtype="bfloat16"))
    text = "The Orvel canal locks were rebuilt in 1931 by the engineer Tamsin Lode, who also built the weir."
    s = rag.ingest_texts([{"doc_id": "canal", "text": text}], "default")
    per_token = mc.num_layers * mc.num_kv_heads * mc.head_dim * 2 * 2  # K and V, bf16
    assert s.kv_chunks == s.chunks >= 1 and s.kv_bytes % per_token == 0  # whole tokens (separators too)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "data").rglob("*.rkv"))
    assert 0.97 * on_disk <= s.kv_bytes <= on_disk, (s.kv_bytes, on_disk)  # the files add only headers


def test_service_settings_store_what_the_cli_stores():
    """One default for the stored KV dtype: `ServiceSettings()` (benches, library callers) and the
    `--store-dtype` flag of `ingest`/`serve` both store bf16."""
    from redknot_rag.cli import build_parser
    from redknot_rag.rag.factory import ServiceSettings

    assert ServiceSettings().store.dtype == build_parser().parse_args(["ingest", "x"]).store_dtype == "bfloat16"


def test_one_source_for_the_answer_defaults():
    """`/query`, `redknot query`, `redknot demo` and the web page start from `QUERY_DEFAULTS`."""
    from redknot_rag.cli import build_parser
    from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
    from redknot_rag.server.schemas import QueryRequest

    parse = build_parser().parse_args
    n = QUERY_DEFAULTS.max_new_tokens
    assert QueryRequest(question="q").max_new_tokens == parse(["query", "q"]).max_new_tokens == n
    assert parse(["demo"]).max_new_tokens == n
