"""Retrieval for SGLang frontend (DSL) programs running against `redknot serve`.

`context()` asks the server's `POST /retrieve` for the top-k chunks of a question and returns
them as the exact text the server's automatic reuse recognizes (the stored chunks, joined the
way the RAG service assembles prompts). Put it right after the fixed system preamble
(`system_prompt()`), at the start of the user turn — the same left context the chunks were
prefilled behind at ingestion — and the server reuses their stored KV instead of prefilling
them; `state.get_meta_info(name)["cached_tokens"]` shows how many tokens were reused.

Example::

    import sglang as sgl
    import redknot_rag.sgl as rk

    sgl.global_config.enable_parallel_encoding = False
    sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000", chat_template_name="chatml"))

    @sgl.function
    def rag_qa(s, question):
        s += sgl.system(rk.system_prompt())
        s += sgl.user(rk.context(question, top_k=4) + question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=128, temperature=0))

    state = rag_qa.run(question="What does the GIL protect?")
    print(state["answer"], state.get_meta_info("answer")["cached_tokens"])

The endpoint and API key default to those of SGLang's default backend (`sgl.set_default_backend`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["Chunk", "Retrieval", "context", "retrieve", "system_prompt"]


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    chunk_id: str
    score: float
    text: str


@dataclass(frozen=True)
class Retrieval:
    """What `/retrieve` answered: `context` is the text to insert; `system` the anchor preamble."""

    context: str
    system: str
    chunks: list[Chunk] = field(default_factory=list)


def _default_backend() -> Any:
    try:
        from sglang.lang.global_config import global_config
    except ImportError:
        return None
    return getattr(global_config, "default_backend", None)


def _resolve(endpoint: str | None, api_key: str | None) -> tuple[str, str | None]:
    if endpoint is None:
        backend = _default_backend()
        endpoint = getattr(backend, "base_url", None)
        if endpoint is None:
            raise ValueError("no endpoint: pass endpoint= or sgl.set_default_backend(sgl.RuntimeEndpoint(url))")
        api_key = api_key if api_key is not None else getattr(backend, "api_key", None)
    return endpoint.rstrip("/"), api_key


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _check(r: httpx.Response, path: str) -> dict[str, Any]:
    if r.status_code != 200:
        try:
            msg = r.json()["error"]["message"]
        except Exception:
            msg = r.text
        raise RuntimeError(f"{path} failed ({r.status_code}): {msg}")
    return r.json()


def _post(endpoint: str, api_key: str | None, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    return _check(httpx.post(endpoint + path, json=body, headers=_headers(api_key), timeout=timeout), path)


def retrieve(
    question: str,
    top_k: int = 6,
    namespace: str = "default",
    endpoint: str | None = None,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> Retrieval:
    """Top-k chunks of `question` from the server's namespace (raises RuntimeError on an error answer)."""
    url, key = _resolve(endpoint, api_key)
    out = _post(url, key, "/retrieve", {"question": question, "top_k": top_k, "namespace": namespace}, timeout)
    chunks = [
        Chunk(c.get("doc_id", ""), c.get("chunk_id", ""), float(c.get("score") or 0.0), c.get("text", ""))
        for c in out.get("chunks", [])
    ]
    return Retrieval(out["context"], out["system"], chunks)


def context(
    question: str, top_k: int = 6, namespace: str = "default", endpoint: str | None = None, api_key: str | None = None
) -> str:
    """The retrieved chunks as prompt text, ready for `s += sgl.user(rk.context(q) + q)`."""
    return retrieve(question, top_k, namespace, endpoint, api_key).context


@functools.lru_cache(maxsize=8)
def _system(endpoint: str, api_key: str | None) -> str:
    r = httpx.get(endpoint + "/rag_info", headers=_headers(api_key), timeout=30.0)
    return _check(r, "/rag_info")["system"]


def system_prompt(endpoint: str | None = None, api_key: str | None = None) -> str:
    """The fixed system preamble that stored chunks were prefilled behind (the anchor)."""
    try:
        url, key = _resolve(endpoint, api_key)
        return _system(url, key)
    except (ValueError, RuntimeError, httpx.HTTPError):
        from redknot_rag.chat import DEFAULT_SYSTEM

        return DEFAULT_SYSTEM
