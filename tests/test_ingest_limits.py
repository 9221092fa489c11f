"""Ingest limits and cancellation (issue 28, item 6): a document is limited in tokens, not characters;
an ingest stops when its HTTP client leaves, and the next ingest says it finishes the backlog."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient

VISIBLE = "The Orvel canal locks were rebuilt in 1931 by the engineer Tamsin Lode."
ZERO_WIDTH = "\u200b" * 400  # ~400 tokens in ~1.2 KB: far under any byte limit


@pytest.fixture
def rag(engine, tmp_path):
    from redknot_rag.rag import RagService

    return RagService(engine, tmp_path / "data", "naive", max_document_tokens=120)


def test_a_document_over_the_token_limit_is_refused_before_anything_is_written(rag):
    from redknot_rag.limits import TooLargeError

    with pytest.raises(TooLargeError, match=r"'zw': \d+ tokens exceeds the limit of 120 tokens"):
        rag.ingest_texts([{"doc_id": "ok", "text": VISIBLE}, {"doc_id": "zw", "text": VISIBLE + ZERO_WIDTH}], "ns")
    assert not rag.db.has_namespace("ns")  # the good document was not written either
    assert rag.ingest_texts([{"doc_id": "ok", "text": VISIBLE}], "ns").documents == 1


def test_the_server_answers_413_naming_the_token_limit(engine, rag):
    from redknot_rag.server.app import create_app
    from redknot_rag.server.runtime import Runtime
    from redknot_rag.server.settings import ServerSettings

    settings = ServerSettings(api_key="u", admin_key="a", log_requests=False)
    with TestClient(create_app(Runtime(engine, settings, rag)), raise_server_exceptions=False) as client:
        body = {"namespace": "ns", "documents": [{"doc_id": "zw", "text": VISIBLE + ZERO_WIDTH}]}
        r = client.post("/ingest", json=body, headers={"Authorization": "Bearer a"})
        assert r.status_code == 413 and "tokens exceeds the limit of 120 tokens" in r.text, r.text
        body["documents"][0]["text"] = VISIBLE
        assert client.post("/ingest", json=body, headers={"Authorization": "Bearer a"}).status_code == 200


def test_a_cancelled_ingest_leaves_a_backlog_the_next_one_reports(rag):
    """Cancelled after the documents are indexed, before any chunk KV: the documents are searchable, the
    chunks without KV are the backlog, and the next ingest finishes it and says so."""
    from redknot_rag.rag.ingest import IngestCancelled

    cancel = threading.Event()
    index = rag.retriever.ingest

    def index_then_leave(*a, **kw):
        out = index(*a, **kw)
        cancel.set()  # the client leaves while the documents are being indexed
        return out

    rag.retriever.ingest = index_then_leave
    with pytest.raises(IngestCancelled):
        rag.ingest_texts_and_paths([{"doc_id": "a", "text": VISIBLE}], [], "ns", cancel)
    rag.retriever.ingest = index
    assert [d["doc_id"] for d in rag.list_documents("ns")] == ["a"]
    assert len(rag.db.chunks_missing_kv("ns")) >= 1
    s = rag.ingest_texts([{"doc_id": "b", "text": "A second, unrelated note about the weir."}], "ns")
    assert s.resumed_kv_chunks >= 1 and rag.db.chunks_missing_kv("ns") == []


def test_the_ingest_route_cancels_when_its_client_leaves():
    """`/ingest`'s worker gets `cancel` set once `request.is_disconnected()` says the client left."""
    from redknot_rag.rag.ingest import IngestCancelled
    from redknot_rag.server import api_rag
    from redknot_rag.server.errors import ApiError

    seen: dict = {}

    class FakeRag:
        def ingest_texts_and_paths(self, docs, paths, namespace, cancel):
            deadline = time.monotonic() + 10
            while not cancel.wait(0.01):
                if time.monotonic() > deadline:
                    return None, None  # never cancelled: the assertion below fails
            seen["cancelled"] = True
            raise IngestCancelled("ingest cancelled: the client left")

    class FakeRuntime:
        async def run_blocking(self, fn, *a):
            return await asyncio.get_running_loop().run_in_executor(None, fn, *a)

    class LeftRequest:
        async def is_disconnected(self) -> bool:
            return True

    async def go():
        return await api_rag._ingest_while_connected(FakeRuntime(), FakeRag(), LeftRequest(), [], [], "ns")

    with pytest.raises(ApiError) as e:
        asyncio.run(go())
    assert seen == {"cancelled": True} and e.value.status == 499


def test_help_and_server_agree_on_the_status_of_what_is_too_long(engine, rag):
    """`serve --help` says 413 for an over-long question and an over-large document; the server answers
    413 for both (issue 28, new user 6), not the schema's 422."""
    import re

    from redknot_rag.cli import build_parser
    from redknot_rag.server.app import create_app
    from redknot_rag.server.runtime import Runtime
    from redknot_rag.server.settings import ServerSettings

    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}
    said = {k: re.search(r"\b(4\d\d)\b", helps[k]).group(1) for k in ("max_question_chars", "max_document_tokens")}
    settings = ServerSettings(api_key="u", admin_key="a", log_requests=False, max_question_chars=50)
    admin = {"Authorization": "Bearer a"}
    with TestClient(create_app(Runtime(engine, settings, rag)), raise_server_exceptions=False) as client:
        client.post("/ingest", json={"namespace": "ns", "documents": [{"doc_id": "a", "text": VISIBLE}]}, headers=admin)
        q = client.post("/query", json={"question": "why " * 30, "namespace": "ns"}, headers=admin)
        body = {"namespace": "ns", "documents": [{"doc_id": "zw", "text": VISIBLE + ZERO_WIDTH}]}
        d = client.post("/ingest", json=body, headers=admin)
    assert (
        said
        == {"max_question_chars": str(q.status_code), "max_document_tokens": str(d.status_code)}
        == {
            "max_question_chars": "413",
            "max_document_tokens": "413",
        }
    ), (q.text, d.text)
