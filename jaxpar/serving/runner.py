"""The runner executes a scheduler's Plan on the decode state: the decode loop, then the prefill calls. It owns
the state (allocated once, on first use, and donated to every program) and sums the expert statistics."""
from __future__ import annotations

import jax
import numpy as np

from jaxpar.engine.programs import to_host


class Runner:
    def __init__(self, programs, params):
        self.programs, self.params = programs, params  # params: a function returning the run-form parameters
        self.state = None
        self.expert_stats: list = []  # per program run, while `collect_stats` is set
        self.collect_stats = False
        self.programs_run = 0

    def ensure_state(self):
        if self.state is None:
            self.state = self.programs.new_state()
        return self.state

    def execute(self, plan):
        """Decode the running slots first, then the prompt chunks (whose finished prompts join the batch for the
        next iteration). -> (per prefill call (tokens [R], ended [R]), decode (tokens [S, steps], done [S]) or
        None)."""
        params, state = self.params(), self.ensure_state()
        decode = None
        if plan.decode_steps:
            state, out, done, stats = self.programs.generate(params, state, plan.table, plan.release,
                                                             np.bool_(plan.any_sampling), plan.decode_steps)
            self._stats(stats)
            decode = (out, done)
        prefill = []
        for call in plan.prefills:
            run = self.programs.prefill_paged if call.paged else self.programs.prefill_first
            state, tok, ended, stats = run(params, state, call.batch, np.bool_(call.any_sampling))
            self._stats(stats)
            prefill.append((tok, ended))
        self.state = state
        self.programs_run += len(prefill) + (decode is not None)
        prefill = [(to_host(t), to_host(e)) for t, e in prefill]
        return prefill, None if decode is None else (to_host(decode[0]), to_host(decode[1]))

    def warmup(self, scheduler, prefill: bool = True) -> int:
        """Compile (by running on padding rows, which write nothing) every program shape the scheduler can ask
        for, so nothing compiles under traffic. Run it before any request. prefill=False: the decode programs
        only (after a change of decode_steps). -> the number of programs."""
        params, shapes = self.params(), scheduler.shapes()
        if not prefill:
            shapes["prefill"] = []
        self.ensure_state()
        flag = np.bool_(False)
        for rows, chunk, paged in shapes["prefill"]:
            batch = scheduler.padding_batch(rows, chunk, scheduler.chunk_bucket(chunk, paged)[1])
            run = self.programs.prefill_paged if paged else self.programs.prefill_first
            self.state = run(params, self.state, batch, flag)[0]
        slots = scheduler.sizes.slots
        for columns in shapes["decode"]:
            self.state = self.programs.generate(params, self.state, np.zeros((slots, columns), np.int32),
                                                np.zeros(slots, bool), flag, scheduler.config.decode_steps)[0]
        jax.block_until_ready(self.state)
        return len(shapes["prefill"]) + len(shapes["decode"])

    def _stats(self, stats) -> None:
        if self.collect_stats and jax.tree.leaves(stats):
            self.expert_stats.append(stats)
