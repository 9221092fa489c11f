"""Hardening, round two (issue 28): what an adversarial probe sent. Every such request answers a 4xx
in bounded time (never a 500), holds nothing after it is refused, and never stalls the others.

In process: the app over the session engine, a small RAG store, a user, an admin and two tenant keys.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import POST_ROUTES

from redknot_rag.sampling import SamplingParams

KEY, ADMIN, KEY_A, KEY_B = "user-key", "admin-key", "tenant-a-key", "tenant-b-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
A_AUTH = {"Authorization": f"Bearer {KEY_A}"}
B_AUTH = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """(TestClient, Runtime) with keys for a user, an admin and tenants A and B; one document in tenant-a."""
    from fastapi.testclient import TestClient

    from redknot_rag.rag import RagService
    from redknot_rag.server.app import create_app
    from redknot_rag.server.auth import TenantKey
    from redknot_rag.server.runtime import Runtime
    from redknot_rag.server.settings import ServerSettings

    settings = ServerSettings(
        api_key=KEY,
        admin_key=ADMIN,
        tenant_keys=(TenantKey(KEY_A, frozenset({"tenant-a"})), TenantKey(KEY_B, frozenset({"tenant-b"}))),
        reuse_policy="naive",
        max_request_bytes=3_000_000,
        max_new_tokens_limit=64,
        log_requests=False,
        graceful_timeout_s=5.0,
    )
    rag = RagService(engine, tmp_path_factory.mktemp("abuse") / "data", "naive")
    rt = Runtime(engine, settings, rag)
    with TestClient(create_app(rt), raise_server_exceptions=False) as client:
        doc = {"doc_id": "d1", "text": "The Orvel canal locks were rebuilt in 1931 by the engineer Tamsin Lode."}
        r = client.post("/ingest", json={"namespace": "tenant-a", "documents": [doc]}, headers=ADMIN_AUTH)
        assert r.status_code == 200, r.text
        yield client, rt


def _err(r, status: int, needle: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert body["error"]["code"] == status and needle.lower() in body["error"]["message"].lower(), body
    return body


def _raw(client, path: str, body: str | bytes, headers: dict = ADMIN_AUTH):
    return client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})


# ---- item 3: answers of 500 ---------------------------------------------------------------------------
@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("body", ["[" * 100_000, '{"a":' * 5_000], ids=["arrays", "objects"])
def test_deeply_nested_json_is_400_on_every_post_route(served, route, body):
    client, _ = served
    _err(_raw(client, route, body), 400, "nested deeper than")


def test_json_nested_past_the_limit_inside_a_valid_body_is_400(served):
    """Parseable JSON (depth 300) in a free-form field: refused before validation or a grammar recurses."""
    client, _ = served
    schema = '{"type": "array", "items": ' * 300 + '{"type": "string"}' + "}" * 300
    body = '{"text": "hi", "sampling_params": {"max_new_tokens": 1, "json_schema": ' + schema + "}}"
    _err(_raw(client, "/generate", body), 400, "nested deeper than 64")
    ok = '{"type": "array", "items": ' * 8 + '{"type": "string"}' + "}" * 8  # a real schema's depth is fine
    r = _raw(client, "/generate", '{"text": "hi", "sampling_params": {"max_new_tokens": 1, "json_schema": ' + ok + "}}")
    assert r.status_code == 200, r.text


def test_stop_ids_covering_the_vocabulary_with_a_minimum_length_are_400(served):
    from redknot_rag.server.errors import ApiError
    from redknot_rag.server.runtime import GenInput

    _, rt = served
    vocab = rt.engine.model_config.vocab_size
    every = SamplingParams(max_new_tokens=4, min_new_tokens=2, stop_token_ids=tuple(range(vocab)), temperature=0.7)
    with pytest.raises(ApiError) as e:
        rt.build(GenInput([1, 2, 3], every))
    assert e.value.status == 400 and "min_new_tokens" in e.value.message
    outside = SamplingParams(max_new_tokens=4, min_new_tokens=2, stop_token_ids=(vocab + 5,))
    with pytest.raises(ApiError, match="stop_token_ids: .* outside the vocabulary"):
        rt.build(GenInput([1, 2, 3], outside))


def test_engine_stops_instead_of_sampling_nan_when_stops_cover_every_token(engine):
    """Callers without HTTP: the stop wins over `min_new_tokens` (never a NaN softmax)."""
    vocab = engine.model_config.vocab_size
    p = SamplingParams(max_new_tokens=4, min_new_tokens=3, stop_token_ids=tuple(range(vocab)), temperature=0.7)
    req = engine.make_request([1, 2, 3], p)
    engine.submit(req)
    for _ in range(20):
        if req.is_finished:
            break
        if engine.is_looping:  # the served fixture's loop thread drives it
            req.done.wait(60)
        else:
            engine.step()
    assert req.is_finished and req.error is None, req.error
    assert len(req.output_ids) == 1 and req.finish_reason["type"] == "stop"


@pytest.mark.parametrize("rx", [r"[^\s\S]", r"[^\d\D]+", r"x(?:[^\w\W]|[^\s\S])", r"(yes|[^\s\S])"])
def test_regex_with_a_class_no_character_matches_is_400(served, rx):
    """xgrammar let partial UTF-8 tokens through such a class: `(yes|[^\\s\\S])` answered an emoji."""
    client, _ = served
    r = client.post(
        "/generate", json={"text": "hi", "sampling_params": {"regex": rx, "max_new_tokens": 4}}, headers=AUTH
    )
    _err(r, 400, "matches no character")


# ---- item 4: a refused batch leaves nothing behind ----------------------------------------------------
def test_batch_refused_with_429_leaves_no_jobs(served, monkeypatch):
    """The engine queue fills after two of a batch's four prompts: the 429 leaves no job in `Runtime.jobs`,
    so the rids are free again, /abort_request does not find them and a drain has nothing to wait for."""
    from redknot_rag.engine import EngineOverloadedError

    client, rt = served
    real_submit, calls = rt.engine.submit, []

    def submit_two(req):
        calls.append(req.rid)
        if len(calls) > 2:
            raise EngineOverloadedError("test: queue full")
        return real_submit(req)

    rids = [f"batch-{i}" for i in range(4)]
    body = {"text": ["a", "b", "c", "d"], "rid": rids, "sampling_params": {"max_new_tokens": 64, "ignore_eos": True}}
    monkeypatch.setattr(rt.engine, "submit", submit_two)
    r = client.post("/generate", json=body, headers=AUTH)
    monkeypatch.setattr(rt.engine, "submit", real_submit)
    _err(r, 429, "overloaded")
    assert r.headers["Retry-After"] == "1"
    assert not set(rids) & {j.public_rid for j in rt.jobs.values()}, list(rt.jobs)
    _err(client.post("/abort_request", json={"rid": "batch-0"}, headers=ADMIN_AUTH), 404, "no request")
    again = client.post("/generate", json={**body, "sampling_params": {"max_new_tokens": 2}}, headers=AUTH)
    assert again.status_code == 200, again.text  # the rids are reusable
    assert [o["meta_info"]["id"] for o in again.json()] == rids


# ---- item 1: bounded grammars and stop lists -------------------------------------------------------------
def _enum_schema(n: int) -> str:
    import json

    return json.dumps({"enum": [f"w{i:06d}{'x' * (i % 7)}" for i in range(n)]})


def test_grammar_compile_over_its_time_is_killed_and_the_pool_recovers(engine):
    """A compile that runs past the pool's timeout is killed with its worker; the next compile works."""
    import xgrammar as xgr

    from redknot_rag.engine.grammar_compiler import GrammarCompilerPool, GrammarTimeoutError

    mc = engine.model_config
    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=mc.vocab_size, stop_token_ids=[2])
    pool = GrammarCompilerPool(info, num_workers=1, timeout_s=30.0)
    try:
        assert pool.compile("regex", "(yes|no)") is not None  # starts the worker
        (worker,) = pool._free
        pool.timeout_s = 0.05
        t0 = time.perf_counter()
        with pytest.raises(GrammarTimeoutError, match="longer than 0.05 s"):
            pool.compile("json_schema", _enum_schema(20_000))
        assert time.perf_counter() - t0 < 5 and not worker.proc.is_alive()
        pool.timeout_s = 30.0
        assert pool.compile("regex", "[0-9]{3}") is not None
    finally:
        pool.close()


def test_grammar_over_the_size_limit_or_the_time_limit_is_400(served, monkeypatch):
    from redknot_rag.engine.grammar import MAX_GRAMMAR_CHARS, GrammarBackend

    client, rt = served
    huge = "(" + "|".join(f"w{i:06d}" for i in range(MAX_GRAMMAR_CHARS // 8 + 1)) + ")"
    sp = {"max_new_tokens": 2}
    r = client.post("/generate", json={"text": "hi", "sampling_params": {**sp, "regex": huge}}, headers=AUTH)
    _err(r, 400, f"the limit is {MAX_GRAMMAR_CHARS}")
    mc = rt.engine.model_config
    pool = GrammarBackend.of(rt.tokenizer, mc.vocab_size, tuple(mc.eos_token_ids)).compilers
    # 1 ms: a 5,000-item enum compiles in tens of ms on a quiet machine (0.05 s was flaky), and the
    # round trip to the worker process alone takes longer than this limit
    monkeypatch.setattr(pool, "timeout_s", 0.001)
    t0 = time.perf_counter()
    body = {"text": "hi", "sampling_params": {**sp, "json_schema": _enum_schema(5_000)}}
    _err(client.post("/generate", json=body, headers=AUTH), 400, "json_schema too complex")
    assert time.perf_counter() - t0 < 10


def test_backtracking_stop_regex_is_cut_off_and_does_not_stall_others(served):
    """The probe's request: output `a{25}` searched by `(a|a)*\\d` (exponential backtracking) took 128 s
    on the event loop while a 2-token request timed out. Now the search is bounded: the probe fails
    with a 400 naming stop_regex, and the short request and /health answer meanwhile."""
    import httpx

    client, _ = served

    async def run() -> tuple[httpx.Response, httpx.Response, float, float]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH, timeout=120) as c:
            probe_sp = {"regex": "a{25}", "stop_regex": "(a|a)*\\d", "max_new_tokens": 30}
            probe = asyncio.create_task(c.post("/generate", json={"text": "Write a's:", "sampling_params": probe_sp}))
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            short = await c.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
            health = await c.get("/health")
            assert health.status_code == 200
            t_short = time.perf_counter() - t0
            return await probe, short, t_short, time.perf_counter() - t0

    t0 = time.perf_counter()
    probe, short, t_short, _ = asyncio.run(run())
    assert short.status_code == 200 and t_short < 15, (short.text, t_short)
    _err(probe, 400, "stop_regex '(a|a)*\\d' took too long")
    assert time.perf_counter() - t0 < 30


def test_stop_regex_still_cuts_the_output(served):
    client, _ = served
    sp = {"max_new_tokens": 16, "regex": "abc123def", "stop_regex": r"\d{2}"}
    r = client.post("/generate", json={"text": "Say it:", "sampling_params": sp}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "abc" and r.json()["meta_info"]["finish_reason"] == {"type": "stop", "matched": r"\d{2}"}


@pytest.mark.parametrize(
    "sp, needle",
    [
        ({"stop": ["x"] * 200_000}, "stop: at most 32 strings"),
        ({"stop": ["y" * 257]}, "stop: a string has 257 characters"),
        ({"stop_regex": ["a"] * 9}, "stop_regex: at most 8 patterns"),
        ({"stop_regex": "b" * 1001}, "stop_regex: a pattern has 1001 characters"),
    ],
)
def test_stop_lists_over_their_limits_are_400(served, sp, needle):
    client, _ = served
    r = client.post("/generate", json={"text": "hi", "sampling_params": {**sp, "max_new_tokens": 2}}, headers=AUTH)
    _err(r, 400, needle)


def test_chat_stop_list_over_the_limit_is_400(served):
    client, rt = served
    body = {"model": rt.model_name, "messages": [{"role": "user", "content": "hi"}], "stop": ["z"] * 33}
    _err(client.post("/v1/chat/completions", json=body, headers=AUTH), 400, "stop: at most 32")


# ---- item 7: side channels between tenants --------------------------------------------------------------
def test_metrics_need_the_admin_key_when_keys_are_configured(served):
    client, _ = served
    _err(client.get("/metrics"), 401, "missing API key")
    for key in (AUTH, A_AUTH):
        _err(client.get("/metrics", headers=key), 403, "admin key")
    r = client.get("/metrics", headers=ADMIN_AUTH)
    assert r.status_code == 200 and "redknot_request_success_total" in r.text


def test_server_info_gives_the_model_path_to_admins_only(served):
    client, rt = served
    for key in (AUTH, A_AUTH):
        info = client.get("/server_info", headers=key).json()
        assert "model_path" not in info and rt.model_dir not in str(info) and info["served_model_name"]
    assert client.get("/server_info", headers=ADMIN_AUTH).json()["model_path"] == rt.model_dir


def test_a_tenant_cannot_probe_or_squat_another_tenants_rid(served):
    """Tenant A's `rid` in flight: tenant B using the same rid neither learns that (no 400) nor takes it
    (A's request goes on, B's abort finds nothing of A's); A still cannot reuse its own rid in flight."""
    import httpx

    client, rt = served

    async def run() -> tuple[int, int, int, int, dict, dict]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            long = {
                "text": "Tell a long story.",
                "rid": "job-7",
                "sampling_params": {"max_new_tokens": 48, "ignore_eos": True},
            }
            task = asyncio.create_task(c.post("/generate", json=long, headers=A_AUTH))
            for _ in range(400):
                if any(j.public_rid == "job-7" for j in rt.jobs.values()):
                    break
                await asyncio.sleep(0.05)
            short = {**long, "sampling_params": {"max_new_tokens": 2}}
            other = await c.post("/generate", json=short, headers=B_AUTH)
            dup = await c.post("/generate", json=short, headers=A_AUTH)
            b_abort = await c.post("/abort_request", json={"rid": "job-7"}, headers=B_AUTH)
            a_abort = await c.post("/abort_request", json={"rid": "job-7"}, headers=A_AUTH)
            done = await task
            return (
                other.status_code,
                dup.status_code,
                b_abort.status_code,
                a_abort.status_code,
                other.json(),
                done.json(),
            )

    other, dup, b_abort, a_abort, other_body, done = asyncio.run(run())
    assert (other, dup, b_abort, a_abort) == (200, 400, 404, 200), other_body
    assert other_body["meta_info"]["id"] == "job-7" and done["meta_info"]["id"] == "job-7"
    assert done["meta_info"]["finish_reason"]["type"] == "abort"


# ---- item 9: limits answer as documented ------------------------------------------------------------------
def test_a_document_over_2_000_000_chars_answers_413(served):
    client, _ = served
    doc = {"doc_id": "big", "text": "a" * 2_000_001}
    r = client.post("/ingest", json={"namespace": "tenant-a", "documents": [doc]}, headers=ADMIN_AUTH)
    _err(r, 413, "2000001 bytes exceeds the limit of 2000000 bytes")


def test_a_question_over_16_000_chars_answers_413(served):
    client, _ = served
    for path in ("/query", "/retrieve"):
        r = client.post(path, json={"question": "x" * 16_001, "namespace": "tenant-a"}, headers=ADMIN_AUTH)
        _err(r, 413, "question of 16001 chars exceeds the limit of 16000")


# ---- item 5: server-side paths stay under a configured ingest root ------------------------------------------
def test_paths_ingest_is_refused_without_an_ingest_root(served, tmp_path):
    client, rt = served
    assert rt.settings.ingest_root is None
    (tmp_path / "a.txt").write_text("Some text.")
    r = client.post("/ingest", json={"namespace": "tenant-a", "paths": [str(tmp_path / "a.txt")]}, headers=ADMIN_AUTH)
    _err(r, 403, "--ingest-root")


def test_paths_ingest_stays_under_the_ingest_root(served, tmp_path, monkeypatch):
    """A file outside the root, `.`-style escapes and a symlink (a file, or inside a folder) leading out
    answer 403 and write nothing; a file under the root (absolute or relative to it) is ingested."""
    import dataclasses

    client, rt = served
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "docs").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("The vault code is 1234.")
    (root / "docs" / "ok.txt").write_text("The Orvel ferry leaves at nine.")
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "docs" / "sneaky.txt").symlink_to(outside / "secret.txt")
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, ingest_root=root))

    def ingest(*paths: str):
        return client.post("/ingest", json={"namespace": "rooted", "paths": list(paths)}, headers=ADMIN_AUTH)

    _err(ingest(str(outside / "secret.txt")), 403, "outside the ingest root")
    _err(ingest("../outside/secret.txt"), 403, "outside the ingest root")
    _err(ingest(str(root / "link.txt")), 403, "outside the ingest root")
    _err(ingest(str(root / "docs")), 403, "leads outside the ingest root")
    _err(ingest("/etc/hostname"), 403, "outside the ingest root")
    assert "rooted" not in rt.rag.db.list_namespaces()
    (root / "docs" / "sneaky.txt").unlink()
    for path in (str(root / "docs" / "ok.txt"), "docs"):
        r = ingest(path)
        assert r.status_code == 200, r.text
    assert "rooted" in rt.rag.db.list_namespaces()


# ---- item 6: blank is blank ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "blank", ["\u200b" * 50, "\x00\ufeff\x00", "\u2060 \u200d\n\ufeff"], ids=["zwsp", "nul-bom", "mix"]
)
def test_questions_and_documents_of_only_invisible_characters_are_blank(served, blank):
    client, _ = served
    for path in ("/query", "/retrieve"):
        r = client.post(path, json={"question": blank, "namespace": "tenant-a"}, headers=ADMIN_AUTH)
        _err(r, 422, "question: value error, has no visible text")
    r = client.post(
        "/ingest", json={"namespace": "tenant-a", "documents": [{"doc_id": "z", "text": blank}]}, headers=ADMIN_AUTH
    )
    _err(r, 422, "has no visible text")


# ---- item 8: the crash window between the document DB and the vector index -------------------------------------
def test_start_up_recovers_vectors_a_kill_left_unsaved(engine, tmp_path):
    """A kill after the DB committed a document's chunks but before the vector index was saved (here: the
    index file as it was before that ingest) leaves those chunks without vectors; the next start adds them."""
    from redknot_rag.rag import RagService

    data = tmp_path / "data"
    rag = RagService(engine, data, "naive")
    rag.ingest_texts([{"doc_id": "a", "text": "The Orvel canal freezes for six weeks."}], "crash", with_kv=False)
    before = (data / "index" / "crash.faiss").read_bytes()
    rag.ingest_texts([{"doc_id": "b", "text": "The Quillon dome turns on iron wheels."}], "crash", with_kv=False)
    (data / "index" / "crash.faiss").write_bytes(before)  # the save that the kill prevented
    restarted = RagService(engine, data, "naive")
    assert restarted.retriever.num_vectors("crash") == len(restarted.db.all_chunk_ids("crash")) == 2
    hits = restarted.retriever.search("crash", "What turns on iron wheels?", top_k=1)
    assert hits and "iron wheels" in hits[0].chunk.text and hits[0].cosine is not None  # found by its vector


def test_an_ingest_says_when_it_finishes_what_an_interrupted_one_left(engine, tmp_path):
    """Chunk KV an earlier ingest did not finish is computed by the next one: the summary says how many
    chunks that was (it was silent, and a 1-document ingest took minutes for no visible reason)."""
    from redknot_rag.rag import RagService

    rag = RagService(engine, tmp_path / "data", "naive")
    left = rag.ingest_texts([{"doc_id": "a", "text": "The Orvel canal freezes for six weeks."}], "ns", with_kv=False)
    s = rag.ingest_texts([{"doc_id": "b", "text": "The Quillon dome turns on iron wheels."}], "ns")
    assert left.chunks == 1 and s.chunks == 1
    assert s.kv_chunks == 2 and s.resumed_kv_chunks == 1
