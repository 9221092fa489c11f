"""How a RAG answer is decoded unless a request says otherwise: `/query`, `redknot query`, the demo, the
web page and `RagService.prepare` all read `QUERY_DEFAULTS` (one source).

Greedy. The default model tends to repeat its answer sentence until the token limit, so the defaults
carry what ends an answer; bench/query_defaults measured the candidates against the old default (128
tokens, nothing to end an answer) on the fidelity harness's cases: see its README for the numbers."""

from __future__ import annotations

from redknot_rag.sampling import SamplingParams

QUERY_DEFAULTS = SamplingParams(max_new_tokens=128)
