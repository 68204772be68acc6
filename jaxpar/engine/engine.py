"""The inference engine: logits, batched prefill + decode with a sharded, donated KV cache, streaming."""
from __future__ import annotations

import math
import numbers
import time
from typing import Callable, Sequence

import jax
import numpy as np

from jaxpar.config import ModelConfig
from jaxpar.errors import GenerationError
from jaxpar.engine import params as P
from jaxpar.engine.buckets import batch_bucket, seq_bucket
from jaxpar.engine.steps import Steps, to_global, to_host
from jaxpar.layout.plan import ModelLayout
from jaxpar.parallel import zigzag


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_sampling(max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> None:
    """Validate generation options; the messages name the option as the CLI spells it."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"--temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise GenerationError(f"--top-k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _is_real(top_p) or math.isnan(top_p) or not 0 < top_p <= 1:
        raise GenerationError(f"--top-p must be in (0, 1], got {top_p!r}")
    if not _is_int(seed) or not 0 <= seed < 2 ** 63:
        raise GenerationError(f"--seed must be an integer in [0, 2**63), got {seed!r}")


def unroll_by_default(layout) -> bool:
    """Layers unrolled (per-layer weights and cache) on CPU devices, where a scan copies each layer's weights
    out of the stacked array (about three times the bytes a decode step would read). Scanned on GPU/TPU (one loop body
    whatever the depth, so compile time does not grow with it) and under pipeline stages (stages hold
    stacked layers)."""
    return layout.size("layers") == 1 and layout.mesh.devices.flat[0].platform == "cpu"


class Engine:
    def __init__(self, cfg: ModelConfig, model_layout: ModelLayout, params: dict, tokenizer, unroll=None):
        self.config = cfg
        self.tokenizer = tokenizer
        self.model_layout = model_layout
        self.layout = model_layout.layout
        self.mesh = model_layout.mesh
        self.kv_repeat = model_layout.kv_repeat
        self.unrolled = unroll_by_default(self.layout) if unroll is None else bool(unroll)
        if self.unrolled and self.layout.size("layers") > 1:
            raise GenerationError("unroll=True needs a layout without a stage axis (pipeline stages hold "
                                  "stacked layers)")
        self.params = params
        self.steps = Steps(cfg, self.layout, self.kv_repeat, self.unrolled)
        self._caches: dict = {}  # (batch, length) -> KV cache, allocated once per bucket and reused
        self.last_stats: dict = {}
        self.eos_ids = cfg.eos_ids or tuple(getattr(tokenizer, "eos_ids", ()))

    @property
    def params(self) -> dict:
        """The parameters in the stacked form checkpoints store (rebuilt from the per-layer arrays when the
        layers run unrolled; `run_params` is the form the compiled steps take)."""
        if self.unrolled:
            return P.stack(self.run_params, self.config, self.layout, self.kv_repeat)
        return self.run_params

    @params.setter
    def params(self, value: dict) -> None:
        if self.unrolled and not P.is_unstacked(value):
            value = P.unstack(value, self.config, self.layout, self.kv_repeat)
        self.run_params = value

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def batch_multiple(self) -> int:
        return self.layout.batch_multiple

    def params_bytes_per_device(self) -> int:
        return P.bytes_per_device(self.run_params)

    def cache_struct(self, batch: int, length: int):
        return self.steps.cache_struct(batch, length)

    def save(self, directory: str) -> None:
        """Write an Orbax checkpoint (+ config.yaml) that `jaxpar.load(checkpoint=...)` restores on any mesh."""
        from jaxpar.engine import checkpoint
        checkpoint.save(directory, self.config, self.params, self.kv_repeat, self.layout)

    # ---- full forward ------------------------------------------------------------------------------------
    def logits(self, tokens) -> np.ndarray:
        """int [B, S] -> float32 [B, S, vocab]: the full causal forward pass."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise GenerationError(f"tokens must be a 2-D [batch, seq] array of ids, got shape {tokens.shape}")
        self._check_ids(tokens)
        b, s = tokens.shape
        if s > self.config.max_position_embeddings:
            raise GenerationError(f"sequence of {s} tokens is longer than the context window of "
                                  f"{self.config.max_position_embeddings} (max_position_embeddings)")
        bp = -(-b // self.batch_multiple) * self.batch_multiple
        sp = -(-s // self.steps.seq_multiple) * self.steps.seq_multiple  # padding after the end: causally unseen
        padded = np.zeros((bp, sp), np.int32)
        padded[:b, :s] = tokens
        valid = np.zeros((bp, sp), bool)
        valid[:b, :s] = True
        order = self.steps.seq_order(sp)
        out = to_host(self.steps.logits(self.run_params, padded[:, order], valid[:, order]))
        return out[:b, zigzag.inverse(order)[:s]]

    def _check_ids(self, tokens, what: str = "") -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise GenerationError(f"{what}token ids must be in [0, {self.config.vocab_size}) (model vocab_size), "
                                  f"got min {int(tokens.min())} max {int(tokens.max())}")

    # ---- generation --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], **kw) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        self.check_tokenizer()
        ids = [self.tokenizer.encode(p) for p in prompts]
        return [self.tokenizer.decode(t) for t in self.generate_tokens(ids, **kw)]

    def check_tokenizer(self) -> None:
        """Text in and out needs a tokenizer whose ids the model's vocabulary covers."""
        need = getattr(self.tokenizer, "vocab_size", 0)
        if need > self.config.vocab_size:
            raise GenerationError(f"model vocab_size={self.config.vocab_size} is smaller than the tokenizer's "
                                  f"{need} ids; text prompts need vocab_size >= {need} (token ids can still be "
                                  f"passed to generate_tokens/logits)")

    def generate_tokens(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                        on_token: Callable[[int, int], None] | None = None,
                        stop_at_eos: bool = True, whole_loop: bool = True) -> list[list[int]]:
        """Prompts of token ids (any lengths) -> the new tokens of each, without the end-of-sequence token.
        Every decode step runs in one compiled loop on device; on_token(row, token) is called for each token
        as soon as it is known (the loop hands each step's tokens to the host). whole_loop=False runs one
        program per token from a host loop instead (as does streaming across several processes).
        stop_at_eos=False generates exactly max_new_tokens (benchmarks)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        if not prompts:
            raise GenerationError("no prompts given")
        ctx = self.config.max_position_embeddings
        lens = np.array([len(p) for p in prompts], np.int32)
        for i, (n, p) in enumerate(zip(lens, prompts)):
            if n < 1:
                raise GenerationError(f"prompt {i} is empty")
            self._check_ids(np.asarray(p), f"prompt {i}: ")
            if n > ctx:
                raise GenerationError(f"prompt {i} has {n} tokens, longer than the context window of {ctx} "
                                      f"tokens (max_position_embeddings)")
        b = len(prompts)
        bp = batch_bucket(b, self.batch_multiple)
        s = seq_bucket(int(lens.max()), ctx, self.steps.seq_multiple)
        t = seq_bucket(int(lens.max()) + max_new_tokens, ctx, self.steps.seq_multiple)
        tokens = np.zeros((bp, s), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        tokens = tokens[:, self.steps.seq_order(s)]
        lengths = np.ones(bp, np.int32)
        lengths[:b] = lens
        row_ids = np.arange(bp, dtype=np.int32)
        key = jax.random.PRNGKey(seed)
        top_k = min(top_k, self.config.vocab_size)  # more than the vocabulary is the same as all of it
        sargs = (key, np.float32(max(temperature, 1e-6)), np.int32(top_k), np.float32(top_p), temperature == 0)

        cache = self._caches.pop((bp, t), None) or self.steps.new_cache(bp, t)()
        t_start = time.perf_counter()
        done = np.zeros(bp, bool)
        done[b:] = True
        tok, cache, stats = self.steps.prefill(self.run_params, cache, tokens, lengths, ~done, row_ids, *sargs)
        eos = np.array((self.eos_ids if stop_at_eos else ()) or [-1], np.int32)
        # streaming with several processes stays a host loop, so every process's on_token sees every token
        # (the loop's host callback runs in one process)
        host_loop = not whole_loop or (on_token is not None and jax.process_count() > 1)
        run = self._stream if host_loop else self._whole_loop
        out, cache, expert_stats, t_first = run(tok, cache, stats, lengths, done, row_ids, sargs, eos, b, s, t,
                                                max_new_tokens, on_token)
        self._caches[(bp, t)] = cache
        t_end = time.perf_counter()
        n = sum(len(o) for o in out)
        steps_run = max(len(o) for o in out)
        self.last_stats = {"prompts": b, "new_tokens": n, "ttft_s": t_first - t_start,
                           "tpot_s": (t_end - t_first) / max(steps_run - 1, 1),
                           "tokens_per_s": n / (t_end - t_start), "batch_padded": bp, "prompt_bucket": s,
                           "cache_len": t, "whole_loop": run == self._whole_loop}
        if expert_stats[0]:
            self.last_stats["experts"] = summarise_expert_stats(expert_stats)
        return out

    def _whole_loop(self, tok, cache, stats, lengths, done, row_ids, sargs, eos, b, s, t, max_new, on_token):
        """Every decode step in one compiled program (Steps.decode_loop); the host waits once, at the end.
        With on_token, the loop hands each step's tokens to the host through a callback as it goes."""
        tok.block_until_ready()
        t_first = time.perf_counter()
        width = t  # the output buffer: new tokens never outnumber the cache's slots, and t is already a bucket
        sent, failed = [0], []  # columns already handed to on_token; what on_token raised

        def sink(step, column):
            try:
                for i in range(b):
                    if column[i] >= 0:
                        on_token(i, int(column[i]))
            except BaseException as e:  # inside the loop's callback it would come back as an XLA error
                failed.append(e)
                raise
            sent[0] = step + 1
        try:
            with self.steps.streaming(sink) as call:
                out, cache, loop_stats = self.steps.decode_loop(
                    self.run_params, cache, tok, lengths, np.int32(s), done, row_ids, eos, np.int32(max_new),
                    np.int32(t), *sargs[:4], np.int32(call), width, sargs[4], on_token is not None)
                host = to_host(out)
        except Exception:
            if failed:  # on_token's own exception (KeyboardInterrupt, BrokenPipeError, ...), not XLA's wrapper
                raise failed[0] from None
            raise
        if on_token is not None and sent[0] < width:  # the last column never went through the callback
            sink(sent[0], host[:, sent[0]])
        return [[int(x) for x in row if x >= 0] for row in host[:b]], cache, [stats, loop_stats], t_first

    def _stream(self, tok, cache, stats, lengths, done, row_ids, sargs, eos, b, s, t, max_new, on_token):
        """One decode program per token: each token reaches the host (and on_token) as soon as it is known,
        and the next step is dispatched before the current token is read back, so host and device overlap."""
        ctx = self.config.max_position_embeddings
        expert_stats = [stats]
        out: list[list[int]] = [[] for _ in range(b)]
        t_first = None
        # the arguments every step shares go to the devices once, not once per token
        rep, row = self.steps.rep_sh, self.steps.row_sh
        s_dev, rows_dev = to_global(np.int32(s), rep), to_global(row_ids, row)
        sargs = tuple(to_global(np.asarray(a), rep) for a in sargs[:4]) + sargs[4:]
        for step in range(max_new):
            pos = lengths + step  # where the token just sampled will be written
            last = step == max_new - 1
            nxt = None
            if not last and not np.all(done | (pos >= t)):
                nxt = self.steps.decode(self.run_params, cache, tok, np.minimum(pos, t - 1), s_dev,
                                        ~done & (pos < t), rows_dev, np.int32(step + 1), *sargs)
            host = to_host(tok)
            t_first = t_first or time.perf_counter()
            for i in range(b):
                if done[i]:
                    continue
                if host[i] in eos or pos[i] >= ctx:  # end of sequence, or no room left in the context window
                    done[i] = True
                    continue
                out[i].append(int(host[i]))
                if on_token:
                    on_token(i, int(host[i]))
            if nxt is not None:
                expert_stats.append(nxt[2])
            if nxt is None or np.all(done):
                if nxt is not None:
                    cache = nxt[1]
                break
            tok, cache, _ = nxt
        return out, cache, expert_stats, t_first


def summarise_expert_stats(per_step: list[dict]) -> dict:
    """Sum the per-step expert statistics of one generate call (prefill + decode steps) into per-layer
    tokens per expert, load imbalance (max / mean) and dropped assignments."""
    load = sum(np.asarray(st["load"], np.float64) for st in per_step)  # [layers, experts]
    dropped = sum(np.asarray(st["dropped"], np.float64) for st in per_step)  # [layers]
    mean = load.mean(axis=1)
    imbalance = np.where(mean > 0, load.max(axis=1) / np.maximum(mean, 1e-9), 0.0)
    return {"tokens_per_expert": load.astype(int).tolist(), "imbalance": [round(float(x), 3) for x in imbalance],
            "dropped": dropped.astype(int).tolist(), "assignments": int(load.sum()),
            "dropped_total": int(dropped.sum())}


def compile_steps(engine: Engine, batch: int, prompt_len: int, max_new_tokens: int) -> dict:
    """Compile prefill and decode for the shapes `generate` would use; returns shapes, timings and the
    compiled executables (for jaxpar.inspect and benchmarks)."""
    ctx = engine.config.max_position_embeddings
    check_sampling(max_new_tokens)
    if prompt_len < 1 or prompt_len > ctx:
        raise GenerationError(f"--prompt-len must be between 1 and the context window of {ctx}, got {prompt_len}")
    if batch < 1:
        raise GenerationError(f"--batch must be >= 1, got {batch}")
    b = batch_bucket(batch, engine.batch_multiple)
    s = seq_bucket(prompt_len, ctx, engine.steps.seq_multiple)
    t = seq_bucket(prompt_len + max_new_tokens, ctx, engine.steps.seq_multiple)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32)  # noqa: E731
    f32 = jax.ShapeDtypeStruct((), np.float32)
    key = jax.ShapeDtypeStruct((2,), np.uint32)
    cache = engine.cache_struct(b, t)
    out = {"batch": b, "prompt_len": s, "cache_len": t}
    t0 = time.perf_counter()
    row_mask = jax.ShapeDtypeStruct((b,), np.bool_)
    out["prefill"] = engine.steps.prefill.lower(engine.run_params, cache, i32(b, s), i32(b), row_mask, i32(b), key,
                                                f32, i32(), f32, True).compile()
    t1 = time.perf_counter()
    out["decode"] = engine.steps.decode.lower(engine.run_params, cache, i32(b), i32(b), i32(), row_mask, i32(b),
                                              i32(), key, f32, i32(), f32, True).compile()
    out["compile_s"] = {"prefill": t1 - t0, "decode": time.perf_counter() - t1}
    out["kv_cache_bytes_per_device"] = P.bytes_per_device(cache)
    return out
