"""`redknot_rag.sgl`: the retrieval helper for SGLang DSL programs.

The offline tests fake the HTTP answers; the live one runs a DSL program against the real server
and checks that the retrieved chunks' KV is reused (`cached_tokens`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import httpx
import pytest

import redknot_rag.sgl as rk

HAS_RAG = importlib.util.find_spec("redknot_rag.rag") is not None


class _Fake:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.calls: list[tuple[str, dict, dict]] = []
        self.status, self.body = status, body

    def post(self, url: str, json: dict, headers: dict, timeout: float) -> httpx.Response:
        self.calls.append((url, json, headers))
        return httpx.Response(self.status, json=self.body)


def test_retrieve_parses_answer_and_sends_key(monkeypatch):
    fake = _Fake(
        200,
        {
            "context": "A.\n\nB.\n\n",
            "system": "SYS",
            "chunks": [
                {"doc_id": "d", "chunk_id": "d#0", "score": 0.9, "text": "A."},
                {"doc_id": "d", "chunk_id": "d#1", "score": 0.5, "text": "B."},
            ],
        },
    )
    monkeypatch.setattr(rk.httpx, "post", fake.post)
    got = rk.retrieve("q?", top_k=2, namespace="ns", endpoint="http://h:1/", api_key="k")
    assert got.context == "A.\n\nB.\n\n" and got.system == "SYS" and [c.chunk_id for c in got.chunks] == ["d#0", "d#1"]
    url, body, headers = fake.calls[0]
    assert url == "http://h:1/retrieve" and body == {"question": "q?", "top_k": 2, "namespace": "ns"}
    assert headers == {"Authorization": "Bearer k"}
    assert rk.context("q?", endpoint="http://h:1") == "A.\n\nB.\n\n"


def test_retrieve_error_is_clear(monkeypatch):
    monkeypatch.setattr(rk.httpx, "post", _Fake(404, {"error": {"message": "unknown namespace: x"}}).post)
    with pytest.raises(RuntimeError, match="404.*unknown namespace: x"):
        rk.retrieve("q", namespace="x", endpoint="http://h:1")


def test_endpoint_from_sglang_default_backend(monkeypatch):
    from sglang.lang.global_config import global_config

    class Backend:
        base_url, api_key = "http://backend:9", "bk"

    monkeypatch.setattr(global_config, "default_backend", Backend(), raising=False)
    fake = _Fake(200, {"context": "", "system": "S", "chunks": []})
    monkeypatch.setattr(rk.httpx, "post", fake.post)
    rk.retrieve("q")
    assert fake.calls[0][0] == "http://backend:9/retrieve" and fake.calls[0][2]["Authorization"] == "Bearer bk"


def test_no_endpoint_is_an_error(monkeypatch):
    from sglang.lang.global_config import global_config

    monkeypatch.setattr(global_config, "default_backend", None, raising=False)
    with pytest.raises(ValueError, match="no endpoint"):
        rk.retrieve("q")


def test_system_prompt_falls_back_to_the_default():
    from redknot_rag.chat import DEFAULT_SYSTEM

    assert rk.system_prompt(endpoint="http://127.0.0.1:9") == DEFAULT_SYSTEM  # nothing listens there


@pytest.mark.skipif(not HAS_RAG, reason="redknot_rag.rag (RagService) is not in this tree yet")
def test_dsl_program_reuses_retrieved_chunks(tmp_path):
    import sglang as sgl
    from test_server import ADMIN_AUTH, DOCS, KEY, start_server, stop_server

    srv = start_server(tmp_path, data_dir=tmp_path / "data")
    try:
        r = httpx.post(
            srv.url + "/ingest", json={"namespace": "dsl", "documents": DOCS}, headers=ADMIN_AUTH, timeout=300
        )
        assert r.status_code == 200, r.text
        sgl.global_config.enable_parallel_encoding = False
        sgl.set_default_backend(sgl.RuntimeEndpoint(srv.url, api_key=KEY, chat_template_name="chatml"))

        @sgl.function
        def rag_qa(s, question):
            s += sgl.system(rk.system_prompt())
            s += sgl.user(rk.context(question, top_k=2, namespace="dsl") + question)
            s += sgl.assistant(sgl.gen("answer", max_tokens=16, temperature=0))

        st = rag_qa.run(question="Who built the Varnholt lighthouse?")
        assert st["answer"]
        assert st.get_meta_info("answer")["cached_tokens"] > 0
    finally:
        stop_server(srv)
