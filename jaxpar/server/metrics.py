"""Prometheus metrics of one server (its own registry), named as vLLM's with a `jaxpar:` prefix so that
dashboards built for vLLM need only the prefix changed."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, name: str):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends (the soak benchmark reads it)
        label = {"model_name": name}
        self.running = Gauge("jaxpar:num_requests_running", "Requests holding a slot (prefilling or decoding).",
                             ["model_name"], registry=r).labels(**label)
        self.waiting = Gauge("jaxpar:num_requests_waiting", "Requests queued for a slot.", ["model_name"],
                             registry=r).labels(**label)
        self.slots = Gauge("jaxpar:kv_cache_slots_in_use", "Decode slots in use.", ["model_name"],
                           registry=r).labels(**label)
        self.kv_usage = Gauge("jaxpar:kv_cache_usage_perc", "Fraction of the KV cache pages in use (0-1).",
                              ["model_name"], registry=r).labels(**label)
        self.preemptions = Gauge("jaxpar:num_preemptions", "Requests preempted (recomputed later) so far.",
                                 ["model_name"], registry=r).labels(**label)
        self.prompt_tokens = Counter("jaxpar:prompt_tokens", "Prompt tokens of admitted requests.",
                                     ["model_name"], registry=r).labels(**label)
        self.generation_tokens = Counter("jaxpar:generation_tokens", "Tokens generated.", ["model_name"],
                                         registry=r).labels(**label)
        self.finished = Counter("jaxpar:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("jaxpar:time_to_first_token_seconds", "Time from arrival to the first token.",
                              ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**label)
        self.itl = Histogram("jaxpar:inter_token_latency_seconds", "Time between tokens handed to a client.",
                             ["model_name"], buckets=TOKEN_BUCKETS, registry=r).labels(**label)
        self.e2e = Histogram("jaxpar:e2e_request_latency_seconds", "Time from arrival to the end of a request.",
                             ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**label)
        self.queue = Histogram("jaxpar:request_queue_time_seconds", "Time a request waited for its first slot.",
                               ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**label)
        self.name = name

    def sample(self, scheduler) -> None:
        """Read the scheduler's gauges (at scrape time, under the loop's lock)."""
        self.running.set(len(scheduler.admitted))
        self.waiting.set(len(scheduler.waiting))
        self.slots.set(sum(s is not None for s in scheduler.slots))
        self.kv_usage.set(scheduler.pool.in_use() / scheduler.pool.capacity)
        self.preemptions.set(scheduler.preemptions)

    def request_done(self, req) -> None:
        self.finished.labels(model_name=self.name, finished_reason=req.finish_reason or "abort").inc()
        if req.finish_time is not None:
            self.e2e.observe(req.finish_time - req.arrival)
        if req.admit_time is not None:
            self.queue.observe(req.admit_time - req.arrival)

    def text(self) -> bytes:
        return generate_latest(self.registry)
