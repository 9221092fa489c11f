"""Evaluation: case generators (planted and paraphrased facts over a topic corpus), the policy
harness behind `redknot eval`, paired statistics, the store-fidelity runs and the bench-only oracles.

Nothing in serving imports this package; it imports the serving stack (rag, retrieval, store) to
measure it."""
