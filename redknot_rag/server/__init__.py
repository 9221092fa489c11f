"""HTTP serving: the RAG API, SGLang's native API and the OpenAI API over one engine.

Modules: `app` (FastAPI app, errors, access log), `runtime` (engine bridge), `api_rag`,
`api_sglang`, `api_openai` (routes), `schemas` (request bodies), `constrained` (xgrammar:
regex, JSON schema, EBNF; compiled in `grammar_compiler`'s worker processes), `metrics`
(Prometheus), `limits`, `auth`, `logs`, `settings`, `cli` (`redknot serve`).
This package module imports nothing, so its modules never reach one another through it.
"""
