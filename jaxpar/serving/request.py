"""A request and its sampling parameters, checked at the edge (Python API, CLI, HTTP) with messages that name
the field and the numbers."""
from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import numbers
import time

from jaxpar.errors import GenerationError


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """max_tokens: new tokens at most (fewer when the context window ends first); temperature 0 = greedy;
    top_k 0 = off; seed: a request's random numbers depend only on it, its tokens and the step; stop: strings
    that end the completion (matched on the decoded text, which never includes them); ignore_eos: keep
    going past end-of-sequence."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple = ()
    ignore_eos: bool = False

    def check(self, names: dict | None = None) -> "SamplingParams":
        """Validate; names maps a field to how the caller spells it (e.g. --max-new-tokens)."""
        n = {f.name: f.name for f in dataclasses.fields(self)}
        n.update(names or {})
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise GenerationError(f"{n['max_tokens']} must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise GenerationError(f"{n['temperature']} must be a finite number >= 0, got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise GenerationError(f"{n['top_k']} must be an integer >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if not _is_real(p) or math.isnan(p) or not 0 < p <= 1:
            raise GenerationError(f"{n['top_p']} must be in (0, 1], got {p!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise GenerationError(f"{n['seed']} must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise GenerationError(f"{n['stop']} must be a list of non-empty strings, got {self.stop!r}")
        return self


class Status(enum.Enum):
    WAITING = "waiting"  # queued, holds no slot or pages
    PREFILL = "prefill"  # holds a slot; its prompt is entering the cache chunk by chunk
    RUNNING = "running"  # decoding in its slot
    FINISHED = "finished"


_ids = itertools.count()


class Request:
    """prompt: token ids. output: the tokens emitted so far. prefix: what the cache must hold before its next
    token, set at admission (the prompt; for a preempted request, the prompt and its output so far, which it
    recomputes); computed: tokens of the prefix already in the cache."""

    def __init__(self, prompt: list[int], params: SamplingParams, max_new: int, stop_ids: tuple,
                 request_id: str | None = None):
        self.id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.prompt = list(prompt)
        self.params = params
        self.max_new = max_new  # max_tokens bounded by the context window
        self.stop_ids = stop_ids
        self.output: list[int] = []
        self.unread: list[int] = []  # emitted tokens the caller has not taken yet
        self.status = Status.WAITING
        self.slot = self.shard = -1
        self.pages: list[int] = []  # by logical page; the first `released` are given back (0 in their place)
        self.released = 0
        self.prefix: list[int] = []
        self.computed = 0
        self.text: str | None = None  # the completion's text when a stop string cut it
        self.finish_reason: str | None = None
        self.aborted = False
        self.arrival = time.perf_counter()
        self.admit_time: float | None = None  # when it first got a slot
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.preemptions = 0

    @property
    def cache_len(self) -> int:
        """Tokens in the cache while decoding: the prompt and every emitted token but the last (the next decode
        step writes that one)."""
        return len(self.prompt) + len(self.output) - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
