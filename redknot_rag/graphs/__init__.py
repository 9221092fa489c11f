"""CUDA-graph capture and replay of whole forward steps (decode batches; small one-sequence prefills).

The runner owns these; they reach a backend's static metadata only through its capture hooks."""
