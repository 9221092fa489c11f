"""`/query` answers with `QUERY_DEFAULTS` (what ends an answer) unless the body says otherwise (issue 28,
new user 5)."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_query_takes_the_answer_defaults_unless_the_body_overrides_them(engine, tmp_path, monkeypatch):
    from redknot_rag.rag import RagService
    from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
    from redknot_rag.server.app import create_app
    from redknot_rag.server.runtime import Runtime
    from redknot_rag.server.settings import ServerSettings

    rag = RagService(engine, tmp_path / "data", "naive")
    seen: list = []

    def recording_prepare(question, **kw):  # records what /query built and stops there (no decode)
        seen.append(kw["params"])
        raise ValueError("recorded")

    monkeypatch.setattr(rag, "prepare", recording_prepare)
    settings = ServerSettings(log_requests=False)
    with TestClient(create_app(Runtime(engine, settings, rag)), raise_server_exceptions=False) as client:
        r = client.post("/query", json={"question": "When was the weir built?", "namespace": "ns"})
        assert r.status_code == 400 and "recorded" in r.text, r.text
        body = {"question": "When?", "namespace": "ns", "stop": [], "repetition_penalty": 1.0, "max_new_tokens": 4}
        assert client.post("/query", json=body).status_code == 400
    default, overridden = seen
    assert default.max_new_tokens == QUERY_DEFAULTS.max_new_tokens
    assert default.stop == QUERY_DEFAULTS.stop and default.repetition_penalty == QUERY_DEFAULTS.repetition_penalty
    assert overridden.stop == () and overridden.repetition_penalty == 1.0 and overridden.max_new_tokens == 4
