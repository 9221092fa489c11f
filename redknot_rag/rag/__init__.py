"""RAG on stored chunk KV: `layout` (the prompt contract), `chunk_prefill` (chunk KV behind the anchor),
`assemble` (the one way to build a reused request), `ingest`, `service` (the facade), `profiling`
(head-profile calibration)."""

from redknot_rag.rag.ingest import IngestSummary
from redknot_rag.rag.layout import CHUNK_SEPARATOR, QUESTION_TEMPLATE, PromptLayout, chunk_key
from redknot_rag.rag.service import DEFAULT_POLICY, Prepared, RagResult, RagService, Source, run_query

__all__ = [
    "CHUNK_SEPARATOR",
    "DEFAULT_POLICY",
    "QUESTION_TEMPLATE",
    "IngestSummary",
    "Prepared",
    "PromptLayout",
    "RagResult",
    "RagService",
    "Source",
    "chunk_key",
    "run_query",
]
