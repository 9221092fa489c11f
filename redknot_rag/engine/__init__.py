"""The engine, by stage: `scheduler` (admission, page reservations, each step's plan and token
budget), `batch_builder` (plan → `ForwardBatch`, pending recompute included), `output` (sampling,
logprobs, incremental detokenization in `detokenizer`, stop strings), `grammar` (xgrammar masks
beside sampling; compiled in `grammar_compiler`'s worker processes), `handoff` (typed pool work
other threads give the engine thread) and `driver` (the `Engine` that runs them, step by step).
Nothing here imports the server.
"""

from redknot_rag.engine.driver import Engine, StepStats
from redknot_rag.engine.handoff import AssemblyCancelled
from redknot_rag.engine.scheduler import EngineOverloadedError

__all__ = ["AssemblyCancelled", "Engine", "EngineOverloadedError", "StepStats"]
