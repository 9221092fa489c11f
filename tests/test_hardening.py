"""Hardening (issue 13): bad input never fails other requests and always answers 4xx.

Unit level here (sampling validation, policy names, per-request failure isolation in the engine);
the HTTP level (tenancy, drain, limits, the schemathesis run) is further down and in test_server.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import POST_ROUTES

from redknot_rag.reuse import make_policy
from redknot_rag.sampling import InvalidRequestError, SamplingParams


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"frequency_penalty": math.nan},
        {"presence_penalty": -math.inf},
        {"top_p": math.nan},
        {"min_p": math.nan},
        {"repetition_penalty": math.inf},
        {"repetition_penalty": 5e-324},  # found by the fuzzer: logits / 5e-324 overflow to inf, softmax NaN
        {"seed": 2**70},
        {"seed": -1},
        {"n": 0},
        {"n": -1},
        {"max_new_tokens": 1.5},
        {"stop_token_ids": (-3,)},
    ],
)
def test_sampling_params_reject_non_finite_and_out_of_range(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw).validate()


@pytest.mark.parametrize(
    "name", ["bogus", "epic:-1", "cacheblend:5", "redknot:nan", "redknot-local:0.1:-4:-9", "full:1", "epic:x"]
)
def test_bad_policy_names_raise_value_error(name):
    with pytest.raises(ValueError, match="reuse policy"):
        make_policy(name)


@pytest.mark.parametrize("name", ["full", "naive", "epic", "epic:0", "cacheblend:0.2", "redknot:0.1:4:32"])
def test_good_policy_names(name):
    assert make_policy(name).name == name.split(":")[0]


def test_poisoned_request_fails_alone_in_its_batch(engine):
    """A logits processor that raises (as a broken constraint would) fails its own request; the three
    requests batched with it in the same steps finish normally, and no KV page is leaked."""
    free = engine.runner.allocator.num_free
    good = [engine.make_request([1, 2, 3, 4 + i], SamplingParams(max_new_tokens=4)) for i in range(3)]
    bad = engine.make_request([1, 2, 3, 9], SamplingParams(max_new_tokens=4, temperature=0.7))

    def poison(req, logits: torch.Tensor) -> torch.Tensor:
        return logits * math.nan  # softmax → NaN probabilities: torch.multinomial raises

    bad.logits_processor = poison  # type: ignore[attr-defined]
    for r in [good[0], bad, *good[1:]]:
        engine.submit(r)
    for _ in range(50):
        if all(r.is_finished for r in [*good, bad]):
            break
        engine.step()
    assert bad.is_finished and bad.error and "RuntimeError" in bad.error
    for r in good:
        assert r.error is None and len(r.output_ids) == 4, (r.error, r.output_ids)
    assert engine.runner.allocator.num_free == free


# ---- HTTP, in process: the app over the session engine and a small RAG store -------------------
KEY, ADMIN, KEY_A, KEY_B = "user-key", "admin-key", "tenant-a-key", "tenant-b-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
A_AUTH = {"Authorization": f"Bearer {KEY_A}"}
B_AUTH = {"Authorization": f"Bearer {KEY_B}"}
DOC_A = (
    "The Orvel canal locks were rebuilt in 1931 by the engineer Tamsin Lode. Each lock lifts barges "
    "four meters, and the canal freezes for about six weeks every winter."
)
DOC_B = (
    "The Quillon observatory keeps a brass refractor from 1888. Its dome turns on iron wheels and the "
    "staff open it to visitors on the first Sunday of every month."
)


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """(TestClient, Runtime): keys for a user over every namespace, tenants A and B bound to their
    own namespace, and an admin; documents stored in namespaces tenant-a and tenant-b."""
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
        max_request_bytes=300_000,
        max_new_tokens_limit=64,
        max_document_bytes=20_000,
        max_question_chars=40_000,
        log_requests=False,
        ingest_root=tmp_path_factory.getbasetemp(),  # the tests' own files (tmp_path) lie under it
    )
    rag = RagService(engine, tmp_path_factory.mktemp("hardening") / "data", "naive")
    rt = Runtime(engine, settings, rag)
    with TestClient(create_app(rt), raise_server_exceptions=False) as client:
        for ns, doc in (("tenant-a", DOC_A), ("tenant-b", DOC_B)):
            r = client.post(
                "/ingest", json={"namespace": ns, "documents": [{"doc_id": "d1", "text": doc}]}, headers=ADMIN_AUTH
            )
            assert r.status_code == 200, r.text
        yield client, rt


def _err(r, status: int, needle: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"]["code"] == status and needle.lower() in body["error"]["message"].lower(), body


GEN = "/generate"
BAD_INPUT = [
    # (id, path, raw JSON body or object, status, needle)
    ("temperature NaN", GEN, '{"text": "hi", "sampling_params": {"temperature": NaN}}', 400, "NaN"),
    ("frequency_penalty NaN", GEN, '{"text": "hi", "sampling_params": {"frequency_penalty": NaN}}', 400, "NaN"),
    (
        "presence_penalty -inf",
        GEN,
        '{"text": "hi", "sampling_params": {"presence_penalty": -Infinity}}',
        400,
        "Infinity",
    ),
    ("n 0", GEN, {"text": "hi", "sampling_params": {"n": 0}}, 422, "n:"),
    ("n -1", GEN, {"text": "hi", "sampling_params": {"n": -1}}, 422, "n:"),
    ("seed 2**70", GEN, {"text": "hi", "sampling_params": {"seed": 2**70}}, 422, "seed"),
    ("lone surrogate", GEN, '{"text": "a\\ud800b"}', 400, "surrogate"),
    ("policy bogus", "/query", {"question": "x", "namespace": "tenant-a", "reuse_policy": "bogus"}, 422, "policy"),
    ("policy epic:-1", "/query", {"question": "x", "namespace": "tenant-a", "reuse_policy": "epic:-1"}, 422, "policy"),
    (
        "policy cacheblend:5",
        "/query",
        {"question": "x", "namespace": "tenant-a", "reuse_policy": "cacheblend:5"},
        422,
        "policy",
    ),
    (
        "policy redknot:nan",
        "/query",
        {"question": "x", "namespace": "tenant-a", "reuse_policy": "redknot:nan"},
        422,
        "policy",
    ),
    (
        "policy redknot-local negative",
        "/query",
        {"question": "x", "namespace": "tenant-a", "reuse_policy": "redknot-local:0.1:-4:-9"},
        422,
        "policy",
    ),
    ("blank question /query", "/query", {"question": "  \n ", "namespace": "tenant-a"}, 422, "question"),
    ("blank question /retrieve", "/retrieve", {"question": "\t ", "namespace": "tenant-a"}, 422, "question"),
    ("question over the context", "/query", {"question": "7" * 9000, "namespace": "tenant-a"}, 413, "context"),
    ("question over the char limit", "/query", {"question": "x" * 40_001, "namespace": "tenant-a"}, 413, "question"),
    (
        "invalid namespace",
        "/ingest",
        {"namespace": "../etc", "documents": [{"doc_id": "a", "text": "t"}]},
        422,
        "namespace",
    ),
    ("empty document text", "/ingest", {"documents": [{"doc_id": "a", "text": ""}]}, 422, "text"),
    ("blank document text", "/ingest", {"documents": [{"doc_id": "a", "text": " \n"}]}, 422, "text"),
    ("doc_id ..", "/ingest", {"documents": [{"doc_id": "..", "text": "t"}]}, 422, "doc_id"),
    (
        "duplicate doc_id",
        "/ingest",
        {"documents": [{"doc_id": "a", "text": "t"}, {"doc_id": "a", "text": "u"}]},
        422,
        "duplicate",
    ),
    ("empty path", "/ingest", {"paths": [""]}, 422, "paths"),
    ("document over the limit", "/ingest", {"documents": [{"doc_id": "big", "text": "word " * 5000}]}, 413, "exceeds"),
    (
        "unknown model",
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
        404,
        "not found",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_answers_4xx(served, case):
    client, _ = served
    _, path, body, status, needle = case
    kw = (
        {"content": body, "headers": {**ADMIN_AUTH, "Content-Type": "application/json"}}
        if isinstance(body, str)
        else {"json": body, "headers": ADMIN_AUTH}
    )
    _err(client.post(path, **kw), status, needle)


def test_path_ingest_parser_error_is_400(served, tmp_path):
    client, _ = served
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4 binary")
    r = client.post("/ingest", json={"paths": [str(tmp_path / "notes.pdf")]}, headers=ADMIN_AUTH)
    _err(r, 400, "notes.pdf")  # a parser error (corrupt PDF) names the file
    (tmp_path / "big.txt").write_text("word " * 5000)
    _err(client.post("/ingest", json={"paths": [str(tmp_path)]}, headers=ADMIN_AUTH), 413, "exceeds")


def test_poisoned_requests_fail_alone_among_valid_ones(served):
    """Bad requests (NaN, a bad regex, an oversized prompt) sent concurrently with valid ones: each bad
    one gets its own 4xx, every valid one its full answer."""
    import asyncio

    import httpx

    client, _ = served

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH, timeout=120) as c:
            good = {"sampling_params": {"max_new_tokens": 6, "temperature": 0}}
            calls = [c.post(GEN, json={"text": f"Count to {i}:", **good}) for i in range(4)]
            calls.insert(
                1,
                c.post(
                    GEN,
                    content=b'{"text": "hi", "sampling_params": {"temperature": NaN}}',
                    headers={"Content-Type": "application/json"},
                ),
            )
            calls.insert(3, c.post(GEN, json={"text": "x", "sampling_params": {"regex": "(unclosed"}}))
            calls.insert(5, c.post(GEN, json={"input_ids": [42] * 9000}))
            return list(await asyncio.gather(*calls))

    rs = asyncio.run(run())
    assert [r.status_code for r in rs] == [200, 400, 200, 400, 200, 413, 200], [r.text for r in rs]
    assert all(r.json()["meta_info"]["completion_tokens"] == 6 for r in rs if r.status_code == 200)


# ---- tenancy --------------------------------------------------------------------------------------
def test_tenant_cannot_list_read_query_or_delete_another_namespace(served):
    client, _ = served
    for path in ("/query", "/retrieve"):
        body = {"question": "When were the canal locks rebuilt?", "namespace": "tenant-a", "max_new_tokens": 4}
        if path == "/retrieve":
            body.pop("max_new_tokens")
        other = client.post(path, json=body, headers=B_AUTH)
        missing = client.post(path, json={**body, "namespace": "no-such-ns"}, headers=B_AUTH)
        # the same answer as for a namespace that does not exist: nothing about tenant A, no list, no path
        _err(other, 404, "unknown namespace 'tenant-a'")
        assert missing.status_code == 404 and "tenant-b" not in missing.text and "sqlite" not in missing.text
        own = client.post(path, json=body, headers=A_AUTH)
        assert own.status_code == 200, own.text
        assert DOC_A[:20] in own.text  # the owner reads its own chunks
    _err(client.get("/documents", params={"namespace": "tenant-a"}, headers=B_AUTH), 403, "admin")
    _err(client.get("/documents", params={"namespace": "tenant-a"}, headers=AUTH), 403, "admin")
    _err(client.delete("/documents/d1", params={"namespace": "tenant-a"}, headers=B_AUTH), 403, "admin")
    _err(client.post("/flush_cache", headers=A_AUTH), 403, "admin")
    info = client.get("/ui/info", headers=B_AUTH).json()
    assert info["namespaces"] == ["tenant-b"]


def test_tenant_cannot_probe_another_namespace_through_cached_tokens(served):
    """Automatic reuse answers `cached_tokens` > 0 for stored text: a tenant key must not see that for
    text stored in another tenant's namespace (it could test whether a text exists there)."""
    client, rt = served
    ctx = client.post(
        "/retrieve", json={"question": "canal locks", "namespace": "tenant-a", "top_k": 1}, headers=ADMIN_AUTH
    ).json()
    msgs = [{"role": "system", "content": ctx["system"]}, {"role": "user", "content": ctx["context"] + "When?"}]
    body = {"model": rt.model_name, "messages": msgs, "max_tokens": 1, "temperature": 0}

    def cached(headers: dict) -> int:
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(ADMIN_AUTH) > 0  # the probe works for a key over every namespace...
    assert cached(B_AUTH) == 0  # ...and tells tenant B nothing about tenant A's store
    if "namespaces" in __import__("inspect").signature(rt.rag.build_request).parameters:
        assert cached(A_AUTH) > 0  # the owner still reuses its own chunks


def test_shared_kv_survives_a_delete_in_the_other_namespace(served):
    """Two tenants store the same text (the same chunk KV, stored once). The admin deletes it in A; B's
    query still finds its chunk KV stored (no re-prefill on a miss), and A's is gone from A."""
    client, _ = served
    text = "The Sarrow ferry crosses the fjord nine times a day. Its captain, Ilse Varn, has sailed it since 2004."
    for ns in ("shared-a", "shared-b"):
        r = client.post(
            "/ingest", json={"namespace": ns, "documents": [{"doc_id": "ferry", "text": text}]}, headers=ADMIN_AUTH
        )
        assert r.status_code == 200, r.text
    assert client.delete("/documents/ferry", params={"namespace": "shared-a"}, headers=ADMIN_AUTH).status_code == 200
    client.post("/flush_cache", headers=ADMIN_AUTH)  # what B reads must come from the store, not the pool cache
    q = client.post(
        "/query",
        json={"question": "Who captains the Sarrow ferry?", "namespace": "shared-b", "top_k": 1, "max_new_tokens": 2},
        headers=ADMIN_AUTH,
    )
    assert q.status_code == 200, q.text
    timing = q.json()["timing"]
    assert q.json()["sources"][0]["doc_id"] == "ferry" and q.json()["usage"]["cached_tokens"] > 0
    assert "kv_miss_prefill_ms" in timing and timing["kv_miss_prefill_ms"] == 0, timing
    gone = client.get("/documents", params={"namespace": "shared-a"}, headers=ADMIN_AUTH).json()["documents"]
    assert gone == []


def test_abort_reaches_only_own_requests(served):
    import asyncio

    import httpx

    client, rt = served

    async def run() -> tuple[int, int, int, dict]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            long = {
                "text": "Tell a long story.",
                "rid": "story-1",
                "sampling_params": {"max_new_tokens": 64, "ignore_eos": True},
            }
            task = asyncio.create_task(c.post(GEN, json=long, headers=A_AUTH))
            for _ in range(200):
                if any(j.public_rid == "story-1" for j in rt.jobs.values()):
                    break
                await asyncio.sleep(0.05)
            dup = await c.post(GEN, json=long, headers=A_AUTH)  # a rid in flight cannot be reused
            foreign = await c.post("/abort_request", json={"rid": "story-1"}, headers=B_AUTH)
            own = await c.post("/abort_request", json={"rid": "story-1"}, headers=A_AUTH)
            done = await task
            return dup.status_code, foreign.status_code, own.status_code, done.json()

    dup, foreign, own, done = asyncio.run(run())
    assert (dup, foreign, own) == (400, 404, 200)
    assert done["meta_info"]["finish_reason"]["type"] == "abort" and done["meta_info"]["completion_tokens"] < 64


def test_document_ids_with_slashes_delete_over_http(served):
    client, _ = served
    docs = [{"doc_id": "dir/sub/a.md", "text": "alpha text"}, {"doc_id": "a/../b", "text": "beta text"}]
    assert client.post("/ingest", json={"namespace": "ids", "documents": docs}, headers=ADMIN_AUTH).status_code == 200
    r = client.delete("/documents/dir/sub/a.md", params={"namespace": "ids"}, headers=ADMIN_AUTH)
    assert r.status_code == 200 and r.json()["doc_id"] == "dir/sub/a.md"
    r = client.delete("/documents", params={"namespace": "ids", "doc_id": "a/../b"}, headers=ADMIN_AUTH)
    assert r.status_code == 200 and r.json()["doc_id"] == "a/../b"
    left = client.get("/documents", params={"namespace": "ids"}, headers=ADMIN_AUTH).json()["documents"]
    assert left == []


def test_openapi_declares_every_request_body(served):
    client, _ = served
    spec = client.get("/openapi.json").json()
    posts = {p: op["post"] for p, op in spec["paths"].items() if "post" in op}
    assert set(posts) >= set(POST_ROUTES)
    for path, op in posts.items():
        if path == "/flush_cache":
            continue
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"], path
    sp = spec["components"]["schemas"]["SglSamplingParams"]["properties"]
    assert sp["n"]["anyOf"][0]["minimum"] == 1 and sp["top_p"]["anyOf"][0]["exclusiveMinimum"] == 0


def test_health_reports_a_stalled_engine(served):
    """/health answers 503 while the engine thread is stuck in one long piece of work, 200 again after."""
    import dataclasses
    import threading
    import time

    client, rt = served
    settings = rt.settings
    rt.settings = dataclasses.replace(settings, health_stall_s=1.5)
    try:
        assert client.get("/health").status_code == 200
        busy = threading.Thread(target=rt.engine.run_store_work, args=(lambda: time.sleep(5),))
        busy.start()
        time.sleep(0.2)
        codes = [client.get("/health").status_code for _ in range(3)]  # each waits up to 1 s for the probe
        assert codes[-1] == 503, codes
        _err(client.get("/health"), 503, "engine stalled")
        busy.join()
        for _ in range(20):
            if client.get("/health").status_code == 200:
                break
        assert client.get("/health").status_code == 200
    finally:
        rt.settings = settings


def test_cli_query_before_ingest_fails_fast_and_creates_nothing(tmp_path):
    import subprocess
    import sys
    import time

    empty = tmp_path / "nothing-here"
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "redknot_rag.cli", "query", "What is it?", "--data-dir", str(empty)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "redknot ingest" in r.stderr, r.stderr
    assert not empty.exists()  # no empty store left behind
    assert time.perf_counter() - t0 < 60  # refused before the model loads


# ---- the served spec, fuzzed (schemathesis): no 5xx, every answer as the spec declares ----------------
schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")


@pytest.fixture(scope="module")
def api_schema(served):
    client, _ = served
    return schemathesis.openapi.from_asgi("/openapi.json", client.app)


fuzz_schema = schemathesis.pytest.from_fixture("api_schema")


_BOUNDED = {
    "max_new_tokens": 2,
    "max_tokens": 2,
    "max_completion_tokens": 2,
    "min_new_tokens": 2,
    "min_tokens": 2,
    "n": 1,
}


def _small(v: object) -> object:
    """A generated body with cheap work: strings cut to 200 chars, at most 2 new tokens and 1 sample
    (the limits themselves are tested above). Cut values stay schema-valid or get a declared 4xx."""
    if isinstance(v, str):
        return v[:200]
    if isinstance(v, list):
        return [_small(x) for x in v[:4]]
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            cap = _BOUNDED.get(k, 0) if isinstance(k, str) else 0
            if cap and isinstance(x, int) and not isinstance(x, bool) and x > cap:
                x = cap
            out[k] = _small(x)
        return out
    return v


@fuzz_schema.parametrize()
@hypothesis.settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
def test_fuzz_served_spec(case):
    """Every operation of the served spec, bodies included, with schema-valid and invalid data: never a
    5xx, and every status code and error body is one the spec declares. Work per case is bounded
    (`_small`) and the example count is small, so the run stays near a minute or two on a 2-core CPU."""
    from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

    case.body = body = _small(case.body)
    if isinstance(body, dict):  # absent limits would mean hundreds of tokens (defaults are tested elsewhere)
        key = {"/v1/chat/completions": "max_tokens", "/v1/completions": "max_tokens", "/query": "max_new_tokens"}
        k = key.get(case.path)
        if k and body.get(k) is None and body.get("max_completion_tokens") is None:
            body[k] = 2
        if case.path == "/generate":
            sp = body.get("sampling_params")
            if sp is None:
                body["sampling_params"] = {"max_new_tokens": 2}
            for d in sp if isinstance(sp, list) else [sp]:
                if isinstance(d, dict) and d.get("max_new_tokens") is None:
                    d["max_new_tokens"] = 2
    case.call_and_validate(
        headers=ADMIN_AUTH,
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1.0, "top_p": 1e-300},  # rounds to 0 in float32: must still keep the top token
        {"temperature": 1e300},
        {"temperature": 1e300, "top_p": 1e-45, "min_p": 1.0, "top_k": 1},
        {"temperature": 2e-6, "repetition_penalty": 0.01},
    ],
)
def test_extreme_valid_sampling_params_still_sample(kw):
    """Found by the fuzzer: valid but extreme parameters made the sampler's probabilities NaN."""
    from redknot_rag.sampling import apply_penalties, sample_token

    logits = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 5
    logits[3] = float("-inf")  # a masked token (min_new_tokens, constraints)
    p = SamplingParams(**kw)
    p.validate()
    assert 0 <= sample_token(apply_penalties(logits, p, [1, 2]), p, None) < 64
