"""The engine: parameters, KV cache, prefill/decode steps, sampling, checkpoints."""
