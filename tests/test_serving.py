"""Continuous batching invariants: requests that join and leave a running batch at random moments each get
exactly the tokens they get alone (greedy and seeded sampling), on every kind of mesh; aborts change nobody
else's tokens; every page is free once the queue drains; running out of pages loses no request; nothing
compiles after warm-up."""
import asyncio
import functools
import random

import jax
import pytest

from conftest import engine
from jaxpar.errors import GenerationError
from jaxpar.serving.request import SamplingParams
from jaxpar.serving.scheduler import QueueFull

# small buckets so that prompts are chunked (16 tokens a chunk), batches mix prefill and decode, and slots turn over
SERVING = dict(max_num_seqs=4, prefill_chunk=16, max_num_batched_tokens=32, decode_steps=4)
INLINE = {"dp2_pp2_tp2": {"axes": {"data": 2, "stage": 2, "tensor": 2}, "microbatches": 2}}

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration"
    else None)


def serving_engine(mesh, **kw):
    return engine(mesh, INLINE.get(mesh), **{**SERVING, **kw})


def workload(n: int, seed: int, vocab_digits=True):
    """n requests: prompts of 2-40 tokens (sums of digits, so the model's answers vary), 1-12 new tokens,
    every other one sampled with its own seed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = "".join(rng.choice("0123456789+=") for _ in range(rng.randrange(1, 40)))
        prompt = [256] + list(body.encode())
        params = SamplingParams(max_tokens=rng.randrange(1, 13), temperature=0.0 if i % 2 else 0.8, top_k=20,
                                seed=rng.randrange(2 ** 31), ignore_eos=rng.random() < 0.3)
        out.append((prompt, params))
    return out


def alone(eng, prompt, params):
    return eng.generate_tokens([prompt], max_new_tokens=params.max_tokens, temperature=params.temperature,
                               top_k=params.top_k, seed=params.seed, stop_at_eos=not params.ignore_eos)[0]


def run_concurrently(eng, work, seed: int, abort_every: int = 0):
    """Submit the requests a few at a time between scheduler iterations (random moments), abort every
    `abort_every`-th one mid-flight, run until the queue drains. -> (requests, aborted indices)."""
    rng = random.Random(seed)
    loop, reqs, aborted = eng.loop, [], set()
    pending = list(work)
    while pending or loop.scheduler.has_work:
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            if pending:
                reqs.append(loop.add(*pending.pop(0)))
        if abort_every:
            for i, r in enumerate(reqs):
                if i % abort_every == abort_every - 1 and i not in aborted and r.output and not r.finished:
                    loop.abort(r)
                    aborted.add(i)
        if loop.scheduler.has_work:
            loop.step()
    return reqs, aborted


@functools.cache
def solo_on_one_device(n: int, seed: int, moe: bool) -> list:
    """Each request of workload(n, seed) run alone on `single`: the answer every mesh must give."""
    eng = serving_engine("single", model="tiny-add-moe") if moe else serving_engine("single")
    return [alone(eng, p, sp) for p, sp in workload(n, seed)]


# dp2_pp2_tp2 stands for the pipeline meshes and for the data and tensor splits it combines with its stages (a
# slot's pages per data shard, vocab-split sampling): dp2_tp4's concurrent runs are checked against its own solo
# tokens below (preemption, the async API) and its solo tokens against `single` in test_meshes.py
@pytest.mark.parametrize("mesh", ["single", "ep8", "sp4", "dp2_pp2_tp2"])
def test_concurrent_requests_get_their_solo_tokens(mesh):
    """On every kind of mesh (expert, sequence, pipeline with data and tensor), each request of a concurrent run
    gets the tokens it gets alone on one device."""
    eng = serving_engine(mesh)
    work = workload(52, seed=1)
    want = solo_on_one_device(52, 1, eng.config.num_local_experts > 0)
    reqs, aborted = run_concurrently(eng, work, seed=2, abort_every=9)
    assert aborted
    for i, (r, w) in enumerate(zip(reqs, want)):
        if i in aborted:
            assert r.finish_reason == "abort" and r.output == w[:len(r.output)], i
        else:
            assert r.output == w, (mesh, i, r.output, w)
            assert r.finish_reason == ("length" if len(w) == r.max_new else "stop")
    assert eng.scheduler.pool.in_use() == 0 and not eng.scheduler.admitted
    assert all(s is None for s in eng.scheduler.slots)


@pytest.mark.parametrize("mesh", ["single", "dp2_tp4"])
def test_running_out_of_pages_preempts_and_loses_nothing(mesh):
    """A pool of 6 pages per shard for 4 slots of up to 4 pages each: requests are preempted (recomputed
    later) and every one still gets its solo tokens."""
    eng = serving_engine(mesh, num_pages=6)
    work = [(p, SamplingParams(max_tokens=24, temperature=sp.temperature, top_k=20, seed=sp.seed, ignore_eos=True))
            for p, sp in workload(12, seed=3)]
    want = [alone(eng, p, sp) for p, sp in work]
    reqs, _ = run_concurrently(eng, work, seed=4)
    assert [r.output for r in reqs] == want
    assert eng.scheduler.preemptions > 0
    assert eng.scheduler.pool.in_use() == 0


_NO_CACHE: dict = {}


def greedy_without_cache(cfg, n: int, width: int, single) -> tuple:
    """Two prompts of 30 tokens and their next n greedy tokens from full forward passes on one device (`single()`
    makes it) over `width` padded positions (no cache at all): positions after the sequence cannot change its
    logits. Once per model: every mesh and pool of a test below must give these tokens."""
    if (cfg, n, width) not in _NO_CACHE:
        _NO_CACHE[cfg, n, width] = _greedy_without_cache(single(), n, width)
    return _NO_CACHE[cfg, n, width]


def _greedy_without_cache(eng, n: int, width: int) -> tuple:
    import numpy as np
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(0, 512, 30)) for _ in range(2)]
    want = []
    for p in prompts:
        seq = list(p)
        for _ in range(n):
            seq.append(int(np.argmax(eng.logits(np.array([seq + [0] * (width - len(seq))]))[0, len(seq) - 1])))
        want.append(seq[len(p):])
    return prompts, want


@pytest.mark.parametrize("mesh,pool", [("single", 24), ("sp4", 24), ("single", 12)])
def test_a_sliding_window_model_gives_back_the_pages_behind_its_window(mesh, pool):
    """Every layer attends within 24 positions. Two requests of 30 prompt tokens and 70 new ones (25 pages of 4
    tokens each) run together in a pool of 24 pages per shard without preemption: the pages behind a window go
    back to the pool as the requests advance and are handed to the other one. Each gets the greedy tokens of
    full forward passes on one device (no cache at all), and every page is free at the end. Without the window the same
    requests are refused: each alone needs more pages than the pool holds. In a pool of 12 pages the two
    requests cannot hold their windows at once: the second waits for the first's pages, with the same tokens."""
    from jaxpar.config import load_config
    from jaxpar.errors import GenerationError
    cfg = load_config("tiny-llama").replace(sliding_window=24)
    kw = dict(max_num_seqs=2, page_size=4, prefill_chunk=16, max_num_batched_tokens=32, decode_steps=4,
              num_pages=pool // (4 if mesh == "sp4" else 1))  # per seq device
    eng = engine(mesh, model=cfg, **kw)
    assert eng.scheduler.pages_needed(100) == 11  # the window's 23 positions + a 16-token chunk, as pages
    prompts, want = greedy_without_cache(cfg, 70, 112, lambda: engine("single", model=cfg, **kw))
    assert eng.generate_tokens(prompts, max_new_tokens=70, stop_at_eos=False) == want
    assert eng.scheduler.pool.in_use() == 0 and (pool < 22 or eng.scheduler.preemptions == 0)
    with pytest.raises(GenerationError, match="needs 25 KV cache pages"):
        engine(mesh, model=cfg.replace(sliding_window=None), **kw).generate_tokens(prompts, max_new_tokens=70)


@pytest.mark.parametrize("mesh", ["sp4", "pp2"])
def test_a_mixed_sliding_and_full_model_keeps_its_sliding_layers_in_window_rings(mesh):
    """Layers alternate sliding (24 positions) and full attention. The sliding layers' pools hold a fixed ring
    of pages per slot (the window and the next 16-token chunk: 12 pages of 4 tokens with sp4's split, 11
    otherwise) that a request's pages reuse as it advances, while the full layers keep every page. Two requests
    of 30 prompt tokens and 70 new ones (25 pages each, so the rings wrap twice) get the greedy tokens of full
    forward passes on one device (no cache at all), through chunked prefill and decode, and the pools are the sizes said."""
    from jaxpar.config import load_config
    s, f = "sliding_attention", "full_attention"
    cfg = load_config("tiny-llama").replace(sliding_window=24, layer_types=[s, f, s, f])
    kw = dict(max_num_seqs=2, page_size=4, prefill_chunk=16, max_num_batched_tokens=32, decode_steps=4)
    eng = engine(mesh, model=cfg, **kw)
    ring = 12 if mesh == "sp4" else 11
    assert eng.sizes.ring_pages == ring
    pools = [p.shape for p in jax.tree.leaves(eng.programs.state_struct().cache)]
    full_pages = eng.sizes.pool_pages
    assert sorted({p[1] for p in pools}) == sorted({eng.sizes.slots * ring, full_pages})
    prompts, want = greedy_without_cache(cfg, 70, 112, lambda: engine("single", model=cfg, **kw))
    assert eng.generate_tokens(prompts, max_new_tokens=70, stop_at_eos=False) == want


def test_a_pool_filled_by_prefills_alone_still_moves():
    """Four slots all prefilling 8-token chunks of 4-token pages in a pool of 6 pages: one request is preempted
    to make room for another, which grows in the same iteration (a victim preempted without that would be
    admitted straight back, and nothing would move). Every request still gets its solo tokens."""
    eng = engine("single", max_num_seqs=4, page_size=4, prefill_chunk=8, max_num_batched_tokens=16,
                 decode_steps=4, num_pages=6)
    rng = random.Random(9)  # prompts of 12-20 tokens: two or three chunks, at most 6 pages with their outputs
    work = [([256] + list("".join(rng.choice("0123456789+=") for _ in range(rng.randrange(11, 20))).encode()),
             SamplingParams(max_tokens=4, temperature=0.8 * (i % 2), top_k=20, seed=i, ignore_eos=True))
            for i in range(6)]
    want = [alone(eng, p, sp) for p, sp in work]
    reqs = [eng.loop.add(p, sp) for p, sp in work]
    for _ in range(500):
        if not eng.scheduler.has_work:
            break
        eng.loop.step()
    assert [r.output for r in reqs] == want and eng.scheduler.pool.in_use() == 0


def test_a_new_admission_interval_resizes_a_window_sized_pool():
    """With a sliding window the default pool holds each slot's window and its next chunk or decode steps:
    decode steps past the chunk rebuild it (and its programs), so requests it took before are still taken."""
    from jaxpar.config import load_config
    import jaxpar
    eng = jaxpar.load(mesh="single", model=load_config("tiny-llama").replace(sliding_window=24), max_num_seqs=2,
                      page_size=4, prefill_chunk=16, max_num_batched_tokens=32, decode_steps=4)
    before = eng.sizes.pages_per_shard
    eng.set_decode_steps(64)
    assert eng.sizes.pages_per_shard > before and eng.scheduler.pages_needed(200) == 23
    assert len(eng.generate_tokens([list(range(3, 40))], max_new_tokens=100, stop_at_eos=False)[0]) == 100
    assert eng.scheduler.pool.in_use() == 0


def test_nothing_compiles_after_warmup():
    eng = serving_engine("single", max_num_seqs=8)  # its own buckets: warm-up compiles them all
    report = eng.warmup()
    assert report["programs"] == len(eng.scheduler.shapes()["prefill"]) + len(eng.scheduler.shapes()["decode"])
    n = len(COMPILES)
    run_concurrently(eng, workload(30, seed=5), seed=6)
    assert len(COMPILES) == n
    # a new admission interval compiles the decode programs again, and nothing else
    assert eng.set_decode_steps(2)["programs"] == len(eng.scheduler.shapes()["decode"])
    n = len(COMPILES)
    reqs, _ = run_concurrently(eng, workload(10, seed=7), seed=8)
    assert len(COMPILES) == n and all(r.finished for r in reqs)


def test_queue_limit_refuses_and_requests_are_checked():
    eng = serving_engine("single", max_queue=2)
    loop = eng.loop
    a, b = (loop.add([256, 49], SamplingParams(max_tokens=2)) for _ in range(2))
    with pytest.raises(QueueFull, match="queue is full \\(2 waiting"):
        loop.add([256, 49], SamplingParams(max_tokens=2))
    loop.run_until([a, b])
    assert a.output == b.output and a.finished
    with pytest.raises(GenerationError, match="needs .* KV cache pages"):
        serving_engine("single", num_pages=2).loop.add([256] * 40, SamplingParams(max_tokens=20))
    with pytest.raises(GenerationError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0).check()


def test_stop_strings_end_the_text_before_them():
    eng = serving_engine("single")
    full = eng.generate(["123+456="], max_new_tokens=6)[0]
    assert full == "579"
    assert eng.generate(["123+456="], max_new_tokens=6, stop=["7"]) == ["5"]
    assert eng.generate(["123+456="], max_new_tokens=6, stop=["79", "x"]) == ["5"]


def test_async_api_streams_and_a_closed_stream_frees_its_pages():
    eng = serving_engine("dp2_tp4")
    work = workload(8, seed=7)
    want = [alone(eng, p, sp) for p, sp in work]
    loop = eng.loop

    async def one(p, sp):
        toks = []
        async for _, new in loop.submit(p, sp):
            toks += new
        return toks

    loop.start()  # the background loop serves concurrent consumers
    try:
        async def all_of_them():
            return await asyncio.wait_for(asyncio.gather(*(one(p, sp) for p, sp in work)), timeout=120)
        got = asyncio.run(all_of_them())
        assert got == want
        assert loop.complete([256, 49, 43, 49, 61], SamplingParams(max_tokens=3)).output == \
            eng.generate_tokens([[256, 49, 43, 49, 61]], max_new_tokens=3)[0]
    finally:
        loop.stop()

    async def early_close():
        """A client that goes away after its first token (the loop stepped here, so the moment is exact)."""
        gen = loop.submit(work[0][0], SamplingParams(max_tokens=40, ignore_eos=True))
        first = asyncio.ensure_future(gen.__anext__())
        while not first.done():
            await asyncio.sleep(0)
            if not first.done():
                loop.step()
        req, toks = first.result()
        await gen.aclose()
        return req, toks
    closed, toks = asyncio.run(early_close())
    assert closed.finish_reason == "abort" and closed.output[:len(toks)] == toks and len(closed.output) < 40
    assert eng.scheduler.pool.in_use() == 0 and not eng.scheduler.has_work
