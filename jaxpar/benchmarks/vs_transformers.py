"""`python -m jaxpar.bench --vs-transformers`: jaxpar against Hugging Face transformers (PyTorch) on this
CPU, side by side in one run, on the same weights loaded from the same safetensors directory: a ~100M
parameter Llama (float32, hidden 768, 12 layers, 12 heads, 4 kv heads, FFN 2048, vocabulary 8192) with
random weights. Measures greedy decode tokens/s at batch 1 and 16, prefill of 512 tokens, and the memory
read bandwidth of the machine (what batch-1 decode is bound by: all weights are read once per token)."""
from __future__ import annotations

import os
import time

import numpy as np

SHAPE = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False)


def make_model(directory: str) -> str:
    """The benchmark's model: a random Llama saved by transformers as safetensors (made once)."""
    if os.path.isfile(os.path.join(directory, "model.safetensors")):
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def read_bandwidth(mib: int = 1024, repeats: int = 5) -> dict:
    """Bytes/s of reading a large float32 array once: numpy (one thread) and torch (all threads); the machine's
    figure is the faster."""
    import torch
    a = np.ones(mib * 2 ** 20 // 4, np.float32)
    t = torch.from_numpy(a)
    out = {}
    for name, fn in (("numpy", lambda: a.sum()), ("torch", lambda: t.sum())):
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = a.nbytes / best
    out["machine"] = max(out.values())
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_transformers(directory: str, batch: int, prompt: int, new: int, repeats: int) -> dict:
    """transformers' generate, greedy, exactly `new` tokens; decode rate from generate(new) - generate(1)."""
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    ids = torch.from_numpy(_prompts(batch, prompt))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
    gen(2)
    t1 = min(_timed(lambda: gen(1)) for _ in range(repeats))
    tn = min(_timed(lambda: gen(new)) for _ in range(repeats))
    tokens = gen(new)[:, prompt:].numpy()
    return {"prefill_s": t1, "decode_tokens_per_s": batch * (new - 1) / (tn - t1), "tokens": tokens}


def time_jaxpar(directory: str, batch: int, prompt: int, new: int, repeats: int, mesh: str = "single") -> dict:
    import jaxpar
    eng = jaxpar.load(mesh=mesh, hf=directory)
    prompts = [list(r) for r in _prompts(batch, prompt)]

    def gen(n):
        return eng.generate_tokens(prompts, max_new_tokens=n, stop_at_eos=False)
    gen(1), gen(new)  # compile both buckets
    t1 = min(_timed(lambda: gen(1)) for _ in range(repeats))
    tn = min(_timed(lambda: gen(new)) for _ in range(repeats))
    return {"prefill_s": t1, "decode_tokens_per_s": batch * (new - 1) / (tn - t1), "tokens": np.array(gen(new)),
            "params_bytes": eng.params_bytes_per_device()}


def _prompts(batch: int, length: int) -> np.ndarray:
    return np.random.RandomState(0).randint(3, SHAPE["vocab_size"], (batch, length)).astype(np.int64)
