"""The inference engine: a model laid out on a mesh, its compiled programs (programs.py) over one paged decode
state, and the serving loop (jaxpar/serving) that every generation goes through: `generate`/`generate_tokens`
submit their prompts as requests and drive the loop until they end; `submit` is the online API."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from jaxpar.config import ModelConfig
from jaxpar.errors import GenerationError
from jaxpar.engine import params as P
from jaxpar.engine.programs import Programs, to_host
from jaxpar.engine.state import cache_sizes
from jaxpar.layout.plan import ModelLayout
from jaxpar.model.groups import CANONICAL, SPLIT, Form, ring_window, shared_window
from jaxpar.parallel import zigzag
from jaxpar.serving.loop import ServingLoop
from jaxpar.serving.request import SamplingParams
from jaxpar.serving.runner import Runner
from jaxpar.serving.scheduler import Scheduler, ServingConfig

CLI_NAMES = {"max_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
             "top_p": "--top-p", "seed": "--seed", "stop": "--stop"}


def check_sampling(max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> None:
    """Validate generation options; the messages name the option as the CLI spells it."""
    SamplingParams(max_new_tokens, temperature, top_k, top_p, seed).check(CLI_NAMES)


def unroll_by_default(layout) -> bool:
    """Layers unrolled (every layer its own group, model/groups.py) on CPU devices, where a scan copies each
    layer's weights out of the stacked array (about three times the bytes a decode step would read). Scanned on
    GPU/TPU (one loop body per group whatever the depth, so compile time does not grow with it) and under
    pipeline stages (stages hold stacked layers)."""
    return layout.size("layers") == 1 and layout.platform == "cpu"


def run_form(layout, unroll) -> Form:
    """The form of the parameters an engine on `layout` runs (model/groups.Form): split when unrolled (unroll
    None: the default for the layout), else the model's groups, padded for the layout's pipeline stages."""
    if unroll_by_default(layout) if unroll is None else bool(unroll):
        return SPLIT
    return Form(stages=layout.size("layers"))


class Engine:
    def __init__(self, cfg: ModelConfig, model_layout: ModelLayout, params: dict, tokenizer, unroll=None,
                 serving: ServingConfig | None = None):
        self.config = cfg
        self.tokenizer = tokenizer
        self.model_layout = model_layout
        self.layout = model_layout.layout
        self.mesh = model_layout.mesh
        self.kv_repeat = model_layout.kv_repeat
        if unroll and self.layout.size("layers") > 1:
            raise GenerationError("unroll=True needs a layout without a stage axis (pipeline stages hold "
                                  "stacked layers)")
        self.form = run_form(self.layout, unroll)
        self.params = params
        self.last_stats: dict = {}
        self.eos_ids = cfg.eos_ids or tuple(getattr(tokenizer, "eos_ids", ()))
        self.configure(serving or ServingConfig())

    def configure(self, serving: ServingConfig) -> None:
        """(Re)build the decode state's sizes, the programs and the serving loop for these serving options
        (the old state is dropped; nothing may be running)."""
        ctx = self.config.max_position_embeddings
        serving = serving.check(ctx)
        if serving.max_model_len is None:
            serving = dataclasses.replace(serving, max_model_len=ctx)
        self.serving = serving
        self.sizes = self._sizes_for(serving)
        self.programs = Programs(self.config, self.layout, self.kv_repeat, self.form, self.sizes)
        detok = self.tokenizer.decode if hasattr(self.tokenizer, "decode") else None
        self.scheduler = Scheduler(self.sizes, serving, self.layout, self.eos_ids, detok,
                                   window=shared_window(self.config))
        self.runner = Runner(self.programs, lambda: self.run_params)
        self.loop = ServingLoop(self.scheduler, self.runner)

    def _sizes_for(self, serving: ServingConfig):
        return cache_sizes(self.layout, serving.max_num_seqs, serving.max_model_len, serving.page_size,
                           serving.num_pages, shared_window(self.config), serving.ahead, ring_window(self.config))

    def warmup(self) -> dict:
        """Compile every program shape serving can use (prefill rows x chunk buckets, decode table widths), so
        nothing compiles under traffic. -> {"programs": n, "seconds": s}."""
        t0 = time.perf_counter()
        with self.loop.lock:
            n = self.runner.warmup(self.scheduler)
        return {"programs": n, "seconds": time.perf_counter() - t0}

    def set_decode_steps(self, n: int) -> dict:
        """Change the admission interval (decode steps between admissions) of an idle engine. The decode program
        takes it as a static argument, so only the decode programs compile again (`configure` would rebuild
        every program). -> {"programs": n, "seconds": s}."""
        serving = dataclasses.replace(self.serving, decode_steps=n).check(self.config.max_position_embeddings)
        t0 = time.perf_counter()
        with self.loop.lock:
            if self.scheduler.has_work:
                raise GenerationError("set_decode_steps: the engine has requests in flight")
            if self._sizes_for(serving) != self.sizes:  # a window-sized pool depends on the steps ahead too
                self.configure(serving)
                n = self.runner.warmup(self.scheduler)
            else:
                self.serving = self.scheduler.config = serving
                n = self.runner.warmup(self.scheduler, prefill=False)
        return {"programs": n, "seconds": time.perf_counter() - t0}

    @property
    def params(self) -> dict:
        """The parameters in the model's own layer groups, the form checkpoints store (regrouped when the layers
        run unrolled or padded for pipeline stages: `run_params` is the form the compiled programs take)."""
        return P.regroup(self.run_params, self.config, self.layout, self.kv_repeat, CANONICAL)

    @params.setter
    def params(self, value: dict) -> None:
        self.run_params = P.regroup(value, self.config, self.layout, self.kv_repeat, self.form)

    @property
    def unrolled(self) -> bool:
        """Whether every layer runs as its own group (the split form)."""
        return self.form.split

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def batch_multiple(self) -> int:
        return self.layout.batch_multiple

    def params_bytes_per_device(self) -> int:
        return P.bytes_per_device(self.run_params)

    def kv_cache_bytes_per_device(self) -> int:
        """The paged KV cache's pools on one device."""
        return P.bytes_per_device(self.programs.state_struct().cache)

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
        sp = -(-s // self.programs.seq_multiple) * self.programs.seq_multiple  # padding after the end: unseen
        padded = np.zeros((bp, sp), np.int32)
        padded[:b, :s] = tokens
        valid = np.zeros((bp, sp), bool)
        valid[:b, :s] = True
        order = self.programs.seq_order(sp)
        out = to_host(self.programs.logits(self.run_params, padded[:, order], valid[:, order]))
        return out[:b, zigzag.inverse(order)[:s]]

    def _check_ids(self, tokens, what: str = "") -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise GenerationError(f"{what}token ids must be in [0, {self.config.vocab_size}) (model vocab_size), "
                                  f"got min {int(tokens.min())} max {int(tokens.max())}")

    # ---- generation --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], stop: Sequence[str] = (), **kw) -> list[str]:
        """Text in, completions out (without the end-of-sequence token; a completion that hit a stop string
        ends before it)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        self.check_tokenizer()
        ids = [self.tokenizer.encode(p) for p in prompts]
        reqs = self._run(ids, stop=tuple(stop), **kw)
        return [r.text if r.text is not None else self.tokenizer.decode(r.output) for r in reqs]

    def check_tokenizer(self) -> None:
        """Text in and out needs a tokenizer whose ids the model's vocabulary covers."""
        need = getattr(self.tokenizer, "vocab_size", 0)
        if need > self.config.vocab_size:
            raise GenerationError(f"model vocab_size={self.config.vocab_size} is smaller than the tokenizer's "
                                  f"{need} ids; text prompts need vocab_size >= {need} (token ids can still be "
                                  f"passed to generate_tokens/logits)")

    def generate_tokens(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, **kw) -> list[list[int]]:
        """Prompts of token ids (any lengths) -> the new tokens of each, without the end-of-sequence token.
        Options: temperature, top_k, top_p, seed (prompt i samples with seed + i), on_token(row, token) called
        with each token as soon as it reaches the host, stop_at_eos=False to generate exactly max_new_tokens
        (benchmarks). Every prompt is a request of the serving loop: continuous batching, paged KV cache."""
        return [r.output for r in self._run(prompts, max_new_tokens=max_new_tokens, **kw)]

    def check_prompts(self, prompts) -> None:
        ctx = self.serving.max_model_len
        if not len(prompts):
            raise GenerationError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) < 1:
                raise GenerationError(f"prompt {i} is empty")
            self._check_ids(np.asarray(p), f"prompt {i}: ")
            if len(p) > ctx:
                raise GenerationError(f"prompt {i} has {len(p)} tokens, longer than the context window of {ctx} "
                                      f"tokens (max_model_len)")

    def _run(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, on_token: Callable[[int, int], None] | None = None, stop_at_eos: bool = True,
             stop: tuple = ()):
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stop, not stop_at_eos)
        params.check(CLI_NAMES)
        self.check_prompts(prompts)
        loop = self.loop
        t0 = time.perf_counter()
        runs0 = self.runner.programs_run
        self.runner.collect_stats, self.runner.expert_stats = True, []
        reqs = [loop.add(list(map(int, p)), dataclasses.replace(params, seed=(seed + i) % 2 ** 63))
                for i, p in enumerate(prompts)]
        rows = {r: i for i, r in enumerate(reqs)}
        def deliver(r, toks):
            for t in toks:
                on_token(rows[r], t)
        try:
            loop.run_until(reqs, deliver if on_token is not None else None)
        finally:
            self.runner.collect_stats = False
        t1 = time.perf_counter()
        firsts = [r.first_token_time for r in reqs if r.first_token_time is not None]
        t_first = min(firsts) if firsts else t1
        n = sum(len(r.output) for r in reqs)
        steps = max(len(r.output) for r in reqs)
        self.last_stats = {"prompts": len(reqs), "new_tokens": n, "ttft_s": t_first - t0,
                           "tpot_s": (t1 - t_first) / max(steps - 1, 1), "tokens_per_s": n / (t1 - t0),
                           "programs_run": self.runner.programs_run - runs0,
                           "preemptions": sum(r.preemptions for r in reqs),
                           "finish_reasons": [r.finish_reason for r in reqs],
                           "max_new": [r.max_new for r in reqs]}  # max_new_tokens bounded by the context
        if self.runner.expert_stats:
            self.last_stats["experts"] = summarise_expert_stats(self.runner.expert_stats)
        return reqs


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


def compile_steps(engine: Engine, batch: int, prompt_len: int, max_new_tokens: int, decode: bool = True) -> dict:
    """Compile the programs a `generate` call of `batch` prompts of `prompt_len` tokens and max_new_tokens runs
    (engine/steps.py): the first prompt chunk and (unless `decode` is False) the decode loop (one trip of its
    body per decode step). Returns shapes, timings and the compiled executables (for jaxpar.inspect and
    benchmarks)."""
    from jaxpar.engine.steps import step_shapes

    ctx = engine.config.max_position_embeddings
    check_sampling(max_new_tokens)
    if prompt_len < 1 or prompt_len > ctx:
        raise GenerationError(f"--prompt-len must be between 1 and the context window of {ctx}, got {prompt_len}")
    if batch < 1:
        raise GenerationError(f"--batch must be >= 1, got {batch}")
    st = step_shapes(engine.config, engine.layout, engine.kv_repeat, engine.form, engine.serving, engine.eos_ids,
                     batch, prompt_len, max_new_tokens)
    out = {"batch": st.batch, "prompt_len": st.prompt_len, "cache_len": st.cache_len, "page_size": st.page_size}
    t0 = time.perf_counter()
    out["prefill"] = st.programs.prefill_first.lower(*st.prefill(engine.run_params)).compile()
    t1 = time.perf_counter()
    out["decode"] = st.programs.generate.lower(*st.decode(engine.run_params)).compile() if decode else None
    out["compile_s"] = {"prefill": t1 - t0, "decode": time.perf_counter() - t1}
    out["kv_cache_bytes_per_device"] = P.bytes_per_device(st.state.cache)
    return out
