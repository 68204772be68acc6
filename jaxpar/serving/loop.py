"""The serving loop: one scheduler and one runner behind a lock, driven either by the caller (`run_until`: the
offline `generate` calls) or by a background thread (`start`: the online API, `submit` returns an async
iterator of tokens usable from asyncio, `complete` blocks).

Each request keeps the tokens it has not handed out yet (`Request.unread`), and a caller takes only its own
requests' tokens, in order: a caller's on_token may itself call generate (it then drives the loop for a while,
and the outer call's tokens wait for it)."""
from __future__ import annotations

import asyncio
import threading

from jaxpar.serving.request import Request, SamplingParams
from jaxpar.serving.runner import Runner
from jaxpar.serving.scheduler import Scheduler

HEARTBEAT_S = 5.0  # an idle leader's empty plan every this many seconds (see `_heartbeat`)


class ServingLoop:
    def __init__(self, scheduler: Scheduler, runner: Runner):
        self.scheduler, self.runner = scheduler, runner
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self._stepping = threading.Lock()  # one iteration at a time (`step` lets `lock` go while programs run)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.leading = False  # several processes: this one (process 0) broadcasts each plan (`lead`)
        self._listeners: dict = {}  # request -> function called (under the lock) when it got tokens or ended

    # ---- requests -------------------------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        with self.lock:
            req = self.scheduler.add(prompt, params, request_id)
            self.wake.notify_all()
            return req

    def abort(self, req: Request) -> None:
        with self.lock:
            self.scheduler.abort(req)
            self._notify([req])

    def step(self) -> list[Request]:
        """One iteration: schedule, execute, hand out the results. The lock is free while the programs run, so
        requests can be added or aborted meanwhile (an abort frees pages the running programs may still write;
        no one gets them before the next `schedule`, and `update` skips ended requests)."""
        with self._stepping:
            with self.lock:
                plan = self.scheduler.schedule()
                if self.leading:
                    from jaxpar.serving import multihost
                    multihost.broadcast(multihost.to_wire(plan))
            prefill, decode = self.runner.execute(plan)
            with self.lock:
                touched = self.scheduler.update(plan, prefill, decode)
                self._notify(touched)
                return touched

    def _notify(self, reqs) -> None:
        for r in reqs:
            fn = self._listeners.get(r)
            if fn is not None:
                fn(r)
        self.wake.notify_all()

    # ---- several processes ----------------------------------------------------------------------------------
    def lead(self) -> None:
        """Process 0 of several: from now on every iteration's plan is broadcast to the followers."""
        self.leading = True

    def _heartbeat(self) -> None:
        """An empty plan: idle followers wait inside a collective, which times out if nothing comes for long."""
        from jaxpar.serving import multihost
        multihost.broadcast(multihost.WirePlan([], 0, None, None, False))

    def release_followers(self) -> None:
        """Tell the followers that no more plans come (they return from `follow`)."""
        from jaxpar.serving import multihost
        with self.lock:
            multihost.broadcast(multihost.WirePlan([], 0, None, None, False, stop=True))
            self.leading = False

    def follow(self) -> int:
        """Processes other than 0: execute process 0's plans, in its order, until it releases them.
        -> the number of iterations run."""
        from jaxpar.serving import multihost
        n = 0
        while True:
            wire = multihost.broadcast(None)
            if wire.stop:
                return n
            self.runner.execute(multihost.executable(wire))
            n += 1

    # ---- drivers --------------------------------------------------------------------------------------------
    @property
    def background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_until(self, reqs: list[Request], deliver=None) -> None:
        """Run (or, with the background thread, wait) until every request in reqs has ended, calling
        deliver(request, tokens) with each request's new tokens in order. If deliver raises, the requests are
        aborted (their pages freed) and the exception reaches the caller."""
        try:
            while True:
                with self.lock:
                    pending = [(r, r.unread) for r in reqs if r.unread]
                    for r, _ in pending:
                        r.unread = []
                    if not pending and all(r.finished for r in reqs):
                        return
                    if self.error is not None:
                        raise RuntimeError("the serving loop failed") from self.error
                    if not pending and self.background:
                        self.wake.wait(timeout=1.0)
                        continue
                if not pending:
                    self.step()
                    continue
                for r, toks in pending:
                    if deliver is not None:
                        deliver(r, toks)
        except BaseException:
            with self.lock:
                for r in reqs:
                    self.scheduler.abort(r)
            raise

    def start(self) -> None:
        """Run the loop in a background thread: it steps while there is work and sleeps otherwise."""
        if self.background:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="jaxpar-serving-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        with self.lock:
            self._stop = True
            self.wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _serve(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self._stop and not self.scheduler.has_work:
                        if not self.wake.wait(HEARTBEAT_S if self.leading else None) and self.leading:
                            self._heartbeat()
                    if self._stop:
                        return
                self.step()
        except BaseException as e:  # the engine failed: every waiter learns it
            with self.lock:
                self.error = e
                self.wake.notify_all()
                for fn in list(self._listeners.values()):
                    fn(None)

    # ---- the online API -------------------------------------------------------------------------------------
    def open(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> "RequestStream":
        """Queue a request now (QueueFull at once when the queue is full) and return its stream of tokens, an
        async iterator for the running asyncio loop. The background loop must be running (`start`)."""
        return RequestStream(self, prompt, params, request_id)

    async def submit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None):
        """Queue a request and yield (request, new token ids) as they come; the request is aborted if the
        consumer stops early (a closed stream, a cancelled task). `.finish_reason` of the request says why it
        ended. The background loop must be running (`start`)."""
        stream = self.open(prompt, params, request_id)
        try:
            async for toks in stream:
                yield stream.request, toks
        finally:
            stream.close()

    def complete(self, prompt: list[int], params: SamplingParams) -> Request:
        """The blocking convenience: run one request to its end (with or without the background thread)."""
        req = self.add(prompt, params)
        self.run_until([req])
        return req


class RequestStream:
    """One request's new tokens for asyncio: `async for toks in stream` yields lists of ids until the request
    ends (`stream.request.finish_reason` says why). `close()` (also when the iteration is left early or
    cancelled) aborts a request that has not ended, so its slot and pages are free at the next iteration."""

    def __init__(self, loop: ServingLoop, prompt: list[int], params: SamplingParams, request_id: str | None):
        self.loop = loop
        aio = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

        def listener(r):  # called on the loop's thread, under its lock
            if r is None:  # the engine failed
                aio.call_soon_threadsafe(self._queue.put_nowait, None)
                return
            toks, r.unread = r.unread, []
            aio.call_soon_threadsafe(self._queue.put_nowait, (toks, r.finished))

        with loop.lock:
            if loop.error is not None:
                raise RuntimeError("the serving loop failed") from loop.error
            self.request = loop.scheduler.add(prompt, params, request_id)
            loop._listeners[self.request] = listener
            if self.request.finished:
                listener(self.request)
            loop.wake.notify_all()

    async def __aiter__(self):
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    raise RuntimeError("the serving loop failed") from self.loop.error
                toks, finished = item
                if toks:
                    yield toks
                if finished:
                    return
        finally:
            self.close()

    def close(self) -> None:
        with self.loop.lock:
            self.loop._listeners.pop(self.request, None)
            if not self.request.finished:
                self.loop.scheduler.abort(self.request)
                self.loop.wake.notify_all()
