"""The scheduler decides; the runner executes. Each iteration the scheduler

1. ends aborted requests (their pages are free from this iteration on; their slots stop at the next decode);
2. admits waiting requests, first come first served, while a slot and the pages of their first chunk are free;
3. makes sure every running request has pages for the next `decode_steps` tokens, preempting the most recently
   admitted requests when the pool runs out (they go back to the front of the queue and recompute their
   prompt and output so far: nothing is lost or truncated);
4. picks prompt chunks within the token budget (`max_num_batched_tokens`; one request adds at most
   `prefill_chunk` tokens an iteration, at fixed boundaries, so a long prompt cannot hold the running decodes
   up for its whole length);

and, when every layer attends within a sliding window, gives back the pages behind a request's window as it
advances (its next queries cannot see them), so a request holds about window / page_size pages however long
it runs;

and writes the iteration down as a `Plan` of plain arrays. The runner decodes first, then prefills: a prompt
that ends in this iteration joins the batch for the next one. After the runner has executed it, `update` hands
each request its new tokens and ends the finished ones (end-of-sequence or max_tokens on device, stop strings
here on the decoded text)."""
from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from jaxpar.engine.buckets import next_pow2, seq_bucket
from jaxpar.engine.sampling import seed_key
from jaxpar.engine.state import STOP_WIDTH, CacheSizes, PrefillBatch, host_rows, pages_held
from jaxpar.errors import GenerationError
from jaxpar.parallel import zigzag
from jaxpar.serving.pages import PagePool
from jaxpar.serving.request import Request, SamplingParams, Status


class QueueFull(GenerationError):
    """The request queue is full: try again later."""


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """max_num_seqs: requests decoding at once (slots); max_model_len: prompt + generated tokens at most
    (default: the model's context window); page_size: tokens per KV cache page; num_pages: pages per batch shard
    and seq device (default: every slot can reach max_model_len); max_num_batched_tokens: prompt tokens
    prefilled per iteration; prefill_chunk: prompt tokens one request adds per iteration; decode_steps: decode
    steps between admissions (the latency/throughput knob); max_queue: waiting requests at most."""
    max_num_seqs: int = 16
    max_model_len: int | None = None
    page_size: int = 16
    num_pages: int | None = None
    max_num_batched_tokens: int = 512
    prefill_chunk: int = 256
    decode_steps: int = 8
    max_queue: int = 4096

    def check(self, context: int) -> "ServingConfig":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("max_model_len", "num_pages"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GenerationError(f"{f.name} must be an integer >= 1, got {v!r}")
        if self.max_model_len is not None and self.max_model_len > context:
            raise GenerationError(f"max_model_len={self.max_model_len} is longer than the model's context window "
                                  f"of {context} tokens (max_position_embeddings)")
        if self.prefill_chunk > self.max_num_batched_tokens:
            raise GenerationError(f"prefill_chunk={self.prefill_chunk} must be <= max_num_batched_tokens="
                                  f"{self.max_num_batched_tokens}")
        return self

    @property
    def ahead(self) -> int:
        """Tokens a request computes past its cache in one iteration at most (a prompt chunk or decode steps)."""
        return max(self.prefill_chunk, self.decode_steps)


@dataclasses.dataclass
class PrefillCall:
    paged: bool  # later chunks (attending over pages); otherwise every row's chunk starts at position 0
    rows: list  # R entries: (request, chunk length, final) or None for a padding row
    batch: PrefillBatch  # numpy
    any_sampling: bool


@dataclasses.dataclass
class Plan:
    prefills: list
    decode_steps: int  # 0: no decode this iteration
    table: np.ndarray | None  # [S, nb]: each slot's pages, for decode
    release: np.ndarray  # [S] bool: slots to stop before decoding
    any_sampling: bool
    running: list  # the requests decoding in this plan, by slot


class Scheduler:
    def __init__(self, sizes: CacheSizes, config: ServingConfig, layout, eos_ids: tuple, detokenize=None,
                 window: int | None = None):
        """window: the model's sliding window when every layer has one (pages behind it are given back)."""
        self.sizes, self.config, self.window = sizes, config, window
        self.seq_multiple = layout.seq_multiple
        self.microbatches = layout.batch_multiple // layout.size("batch")
        self.eos_ids = tuple(eos_ids)[:STOP_WIDTH]
        self.detokenize = detokenize
        self.pool = PagePool(sizes.batch_shards, sizes.seq_shards, sizes.pages_per_shard)
        self.table = np.zeros((sizes.slots, sizes.max_pages), np.int32)
        self.slots: list[Request | None] = [None] * sizes.slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.admitted: list[Request] = []  # holding a slot, in admission order
        self.pending_release = np.zeros(sizes.slots, bool)
        self.preemptions = 0

    # ---- requests in and out --------------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Queue a request (prompt: token ids, checked by the caller). Raises QueueFull when the queue is full."""
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting requests); try again later")
        limit = self.config.max_model_len
        max_new = max(0, min(params.max_tokens, limit - len(prompt)))
        need = self.pages_needed(len(prompt) + max_new)
        if need > self.pool.capacity // self.sizes.batch_shards:
            raise GenerationError(f"a request of {len(prompt)} prompt tokens and up to {max_new} new tokens needs "
                                  f"{need} KV cache pages of {self.sizes.page_size} tokens, more than the "
                                  f"{self.pool.capacity // self.sizes.batch_shards} one batch shard holds (num_pages)")
        stop_ids = () if params.ignore_eos else self.eos_ids
        req = Request(prompt, params, max_new, stop_ids, request_id)
        if max_new == 0:  # the prompt fills the context window: nothing to generate
            self._finish(req, "length")
        else:
            self.waiting.append(req)
        return req

    def abort(self, req: Request) -> None:
        """End a request now (any status); its pages are free at once, its slot stops at the next decode."""
        if req.finished:
            return
        req.aborted = True
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        self._finish(req, "abort")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.admitted)

    def _finish(self, req: Request, reason: str) -> None:
        if req.slot >= 0:
            self._free_slot(req)
        req.status, req.finish_reason, req.finish_time = Status.FINISHED, reason, time.perf_counter()

    def pages_needed(self, tokens: int) -> int:
        """Pages a request of `tokens` tokens holds at most at once: all of them, or with a sliding window the
        pages from its window's start to the end of its next chunk or decode steps (see `_slide`)."""
        return pages_held(tokens, self.sizes.page_size, self.window, self.config.ahead)

    def _free_slot(self, req: Request) -> None:
        self.pool.release(req.shard, req.pages[req.released:], first=req.released)
        self.table[req.slot] = 0
        self.slots[req.slot] = None
        self.pending_release[req.slot] = True
        self.admitted.remove(req)
        req.slot = req.shard = -1
        req.pages = []
        req.released = 0

    def _slide(self, req: Request, position: int) -> None:
        """With a sliding window: give back the request's pages that hold only positions no query from
        `position` on can see (keys before position - window + 1). Their table entries point at page 0, which
        the kernels read only under the window's mask."""
        if self.window is None:
            return
        upto = min(max(0, position - self.window + 1) // self.sizes.page_size, len(req.pages))
        if upto <= req.released:
            return
        self.pool.release(req.shard, req.pages[req.released:upto], first=req.released)
        req.pages[req.released:upto] = [0] * (upto - req.released)
        self.table[req.slot, req.released:upto] = 0
        req.released = upto

    # ---- planning -------------------------------------------------------------------------------------------
    def _grow(self, req: Request, tokens: int) -> bool:
        """Pages for the first `tokens` positions of a request; False if the pool cannot give them now."""
        need = self.sizes.pages_for(tokens) - len(req.pages)
        if need <= 0:
            return True
        if not self.pool.can_allocate(req.shard, len(req.pages), need):
            return False
        first = len(req.pages)
        new = self.pool.allocate(req.shard, first, need)
        req.pages += new
        self.table[req.slot, first:first + need] = new
        return True

    def _admit(self) -> None:
        per = self.sizes.slots_per_shard
        while self.waiting:
            req = self.waiting[0]
            free = [s for s in range(self.sizes.slots) if self.slots[s] is None]
            if not free:
                return
            # the batch shard with the most free pages among those with a free slot (lowest slot on ties)
            slot = max(free, key=lambda s: (self.pool.free_pages(s // per), -s))
            req.slot, req.shard = slot, slot // per
            req.prefix = req.prompt + req.output
            req.computed = 0
            if not self._grow(req, min(len(req.prefix), self.config.prefill_chunk)):
                req.slot = req.shard = -1
                return
            self.waiting.popleft()
            self.slots[slot] = req
            self.admitted.append(req)
            req.status = Status.PREFILL
            if req.admit_time is None:
                req.admit_time = time.perf_counter()

    def _preempt_for(self, keep: Request) -> bool:
        """Preempt the most recently admitted request other than `keep`; False if there is none."""
        for victim in reversed(self.admitted):
            if victim is not keep:
                self._free_slot(victim)
                victim.status = Status.WAITING
                victim.preemptions += 1
                self.preemptions += 1
                self.waiting.appendleft(victim)
                return True
        return False

    def schedule(self) -> Plan:
        self._admit()
        steps = self.config.decode_steps
        # decode first: running requests keep their pages for the next steps, preempting the newest if needed
        for req in list(self.admitted):
            if req.status is not Status.RUNNING or req.slot < 0:
                continue
            upto = req.cache_len + min(steps, req.max_new - len(req.output))
            self._slide(req, req.cache_len)
            while not self._grow(req, upto):
                if not self._preempt_for(req):
                    raise AssertionError("a request's pages exceed the pool (checked when it was added)")
        prefills = self._plan_prefills()
        running = [r for r in self.admitted if r.status is Status.RUNNING]
        table = None
        if running:
            need = max(self.sizes.pages_for(r.cache_len + min(steps, r.max_new - len(r.output))) for r in running)
            table = self.table[:, :self.table_bucket(need)].copy()
        release = self.pending_release.copy()
        if running:  # this decode stops them
            self.pending_release[:] = False
        for call in prefills:  # a finished prompt's insert takes its slot over (after this decode)
            for row in call.rows:
                if row is not None and row[2]:
                    self.pending_release[row[0].slot] = False
        return Plan(prefills, steps if running else 0, table, release,
                    any(r.params.temperature > 0 for r in running), running)

    def _plan_prefills(self) -> list:
        budget = self.config.max_num_batched_tokens
        first, later = [], []
        for req in list(self.admitted):
            if req.status is not Status.PREFILL or req.slot < 0:
                continue
            chunk = min(self.config.prefill_chunk, len(req.prefix) - req.computed)
            if chunk > budget:
                break
            self._slide(req, req.computed)
            grown = self._grow(req, req.computed + chunk)
            # every slot is prefilling and the pool is full: make room now, for this request (a victim preempted
            # without it growing would be admitted straight back, and nothing would move)
            while not grown and not self._has_decodes() and not first and not later and self._preempt_for(req):
                grown = self._grow(req, req.computed + chunk)
            if not grown:
                continue
            budget -= chunk
            (later if req.computed else first).append((req, chunk, req.computed + chunk == len(req.prefix)))
        return [self._call(rows, paged) for rows, paged in ((first, False), (later, True)) if rows]

    def _has_decodes(self) -> bool:
        return any(r.status is Status.RUNNING for r in self.admitted)

    def _call(self, rows: list, paged: bool) -> PrefillCall:
        """Rows grouped by batch shard (each shard's block of rows writes its own pages and slots), padded to
        the row and length buckets."""
        d = self.sizes.batch_shards
        by_shard = [[r for r in rows if r[0].shard == s] for s in range(d)]
        r_local = self.rows_bucket(max(len(b) for b in by_shard))
        c, nb = self.chunk_bucket(max(chunk for _, chunk, _ in rows), paged)
        batch = self.padding_batch(r_local, c, nb)
        tokens, start, length, final, slot, gen, table, req_rows = (
            batch.tokens, batch.start, batch.length, batch.final, batch.slot, batch.generated, batch.table,
            batch.request)
        r = len(slot)
        placed: list = [None] * r
        for s, block in enumerate(by_shard):
            for i, (req, chunk, fin) in enumerate(block):
                j = s * r_local + i
                placed[j] = (req, chunk, fin)
                tokens[j, :chunk] = req.prefix[req.computed:req.computed + chunk]
                start[j], length[j], final[j], slot[j] = req.computed, chunk, fin, req.slot
                gen[j] = len(req.output)
                cols = min(nb, len(req.pages))
                table[j, :cols] = req.pages[:cols]
                self._request_row(req_rows, j, req)
        if not paged:
            batch.tokens = tokens[:, self._order(c)]
        return PrefillCall(paged, placed, batch, any(p is not None and p[0].params.temperature > 0 for p in placed))

    # ---- the one bucket policy: the shapes every program is compiled for -------------------------------------
    def rows_bucket(self, rows: int) -> int:
        """Prefill rows per batch shard: a power of two, a multiple of the pipeline's microbatches."""
        return -(-next_pow2(rows) // self.microbatches) * self.microbatches

    def chunk_bucket(self, tokens: int, paged: bool) -> tuple[int, int]:
        """(chunk length, page-table columns) of a prefill call whose longest chunk has `tokens` tokens. Later
        chunks carry the whole table (one program per chunk length): attention over pages stops at the last
        page the rows have filled (parallel/paged.py), so the unused columns cost nothing."""
        if paged:
            return next_pow2(tokens, 16), self.sizes.max_pages
        c = seq_bucket(tokens, self.config.max_model_len, self.seq_multiple)
        return c, self.table_bucket(self.sizes.pages_for(c))

    def table_bucket(self, pages: int) -> int:
        """Page-table columns a program reads for `pages` pages: a power of two, a multiple of the seq split."""
        n = self.sizes.seq_shards
        return min(-(-next_pow2(pages) // n) * n, self.sizes.max_pages)

    def shapes(self) -> dict:
        """Every shape the scheduler can ask for: prefill (rows per shard, chunk, paged) and decode table widths."""
        chunk = min(self.config.prefill_chunk, self.config.max_model_len)
        rows = sorted({self.rows_bucket(k) for k in range(1, self.sizes.slots_per_shard + 1)})
        prefill = set()
        for paged in (False, True):
            if paged and chunk >= self.config.max_model_len:
                continue  # every prompt fits one chunk: no later chunks
            for t in range(1, chunk + 1):
                c, _ = self.chunk_bucket(t, paged)
                prefill.update((r, c, paged) for r in rows)
        tables = sorted({self.table_bucket(k) for k in range(1, self.sizes.max_pages + 1)})
        return {"prefill": sorted(prefill), "decode": tables}

    def padding_batch(self, rows_per_shard: int, chunk: int, columns: int) -> PrefillBatch:
        """A prefill batch of padding rows only (nothing written, nothing inserted), to fill in."""
        r = rows_per_shard * self.sizes.batch_shards
        z = lambda: np.zeros(r, np.int32)  # noqa: E731
        return PrefillBatch(tokens=np.zeros((r, chunk), np.int32), start=z(), length=z(),
                            table=np.zeros((r, columns), np.int32), final=np.zeros(r, bool),
                            slot=np.full(r, -1, np.int32), generated=z(), request=host_rows(r))

    def _order(self, c: int):
        return zigzag.order(c, self.sizes.seq_shards)  # a first chunk is split over seq in zigzag order

    @staticmethod
    def _request_row(rows, j: int, req: Request) -> None:
        p = req.params
        top_k = min(p.top_k, np.iinfo(np.int32).max)  # more than the vocabulary is the same as all of it
        rows.max_new[j], rows.temperature[j], rows.top_k[j], rows.top_p[j] = req.max_new, p.temperature, top_k, p.top_p
        rows.keys[j] = seed_key(p.seed)
        rows.stop_ids[j, :len(req.stop_ids)] = req.stop_ids

    # ---- results --------------------------------------------------------------------------------------------
    def update(self, plan: Plan, prefill_results: list, decode_result) -> list[Request]:
        """Hand each request what the runner produced. prefill_results: per call (tokens [R], ended [R]);
        decode_result: (tokens [S, steps], done [S]) or None. -> the requests that got tokens or ended."""
        touched = []
        now = time.perf_counter()
        if decode_result is not None:  # the decode ran first
            out, done = decode_result
            for req in plan.running:
                if req.finished or req.status is not Status.RUNNING:
                    continue
                new = [int(t) for t in out[req.slot] if t >= 0]
                self._emit(req, new, bool(done[req.slot]), now)
                touched.append(req)
        for call, (tok, ended) in zip(plan.prefills, prefill_results):
            for j, row in enumerate(call.rows):
                if row is None:
                    continue
                req, chunk, fin = row
                if req.finished:  # aborted while its chunk ran
                    continue
                req.computed += chunk
                if not fin:
                    continue
                req.status = Status.RUNNING
                self._emit(req, [int(tok[j])] if tok[j] >= 0 else [], bool(ended[j]), now)
                touched.append(req)
        return touched

    def _emit(self, req: Request, new: list[int], ended: bool, now: float) -> None:
        if new and req.first_token_time is None:
            req.first_token_time = now
        req.output += new
        req.unread += new
        if req.params.stop and new and self._stop_string(req):
            return
        if ended:
            self._finish(req, "length" if len(req.output) >= req.max_new else "stop")

    def _stop_string(self, req: Request) -> bool:
        """A stop string in the decoded text ends the request: its text stops before the string."""
        text = self.detokenize(req.output)
        hits = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
        if not hits:
            return False
        req.text = text[:min(hits)]
        self._finish(req, "stop")
        return True
