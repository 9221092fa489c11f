"""How a RAG answer is decoded unless a request says otherwise: `/query`, `redknot query`, the demo, the
web page and `RagService.prepare` all read `QUERY_DEFAULTS` (one source).

Greedy, at most 128 new tokens, ended at the first blank line. The default model tends to repeat its
answer until the token limit, separated by blank lines. bench/query_defaults measured the candidates on
the fidelity harness's 24 cases (CPU, SmolLM2, the served policy): the blank-line stop kept accuracy
(0.75, no case changed) and ended every answer (25% had run to the limit, 21% repeated a sentence; mean
45 -> 18 new tokens, 16.6 -> 5.6 s of decode); a repetition penalty of 1.1 cost 2 of 24 cases. A request
that wants paragraphs sends `stop: []`."""

from __future__ import annotations

from redknot_rag.sampling import SamplingParams

QUERY_DEFAULTS = SamplingParams(max_new_tokens=128, stop=("\n\n",))
