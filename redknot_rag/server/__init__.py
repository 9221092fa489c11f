"""HTTP serving: the RAG API, SGLang's native API and the OpenAI API over one engine.

Modules: `app` (FastAPI app, errors, access log), `runtime` (engine bridge), `api_rag`,
`api_sglang`, `api_openai` (routes), `schemas` (request bodies; grammars compile and mask in
`redknot_rag.engine.grammar`, below the engine), `metrics`
(Prometheus), `limits`, `auth`, `logs`, `settings`, `cli` (`redknot serve`).
This package module imports nothing, so its modules never reach one another through it.
"""
