"""Sequence parallelism: ring and Ulysses attention, the sequence-split KV cache, NVIDIA-style sequence
parallelism. Same answers as `single`; the collectives the formulas predict; memory that falls with N."""
import numpy as np
import pytest

import jaxpar
from conftest import engine, mesh_path
from jaxpar.errors import LayoutError
from jaxpar.inspect import inspect_engine
from jaxpar.layout.mesh_file import parse_mesh
from jaxpar.layout.plan import cache_kv_heads
from jaxpar.parallel import zigzag
from jaxpar.parallel.ring_attention import uses_first_kv_chunk

LONG = "tiny-long"  # shipped config (random weights), long context window
SEQ_MESHES = ["sp4", "sp8", "sp4_ulysses", "dp2_sp2_tp2"]
INLINE = {  # layouts not shipped as files: XLA's own attention on a split sequence, NVIDIA-style SP
    "sp4_dense": {"axes": {"seq": 4}, "attention": "dense"},
    "sp2_tp2_ulysses": {"axes": {"seq": 2, "tensor": 2}, "attention": "ulysses"},
    "tp2_nvsp": {"axes": {"tensor": 2}, "rules": {"residual_seq": "tensor"}},
    "sp2_tp4_nvsp": {"axes": {"seq": 2, "tensor": 4}, "attention": "ring", "rules": {"residual_seq": ["seq", "tensor"]}},
}


def mesh_of(name):
    return parse_mesh(INLINE[name], name) if name in INLINE else mesh_path(name)


def long_engine(name):
    return engine(name, INLINE.get(name), model=LONG)


# ---- zigzag placement ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_ring_schedule_covers_each_causal_block_once_and_balances(n):
    """Replay the kernel's schedule on chunk indices: every (query chunk, key chunk) pair the causal mask
    needs is computed exactly once, nothing fully masked is computed, and every device does the same work."""
    work, seen = [], []
    for i in range(n):
        q = zigzag.chunks(i, n)
        done = [(a, b) for a in q for b in q if b <= a]  # step 0: own block, causal
        for t in range(1, n):
            kv = zigzag.chunks((i - t) % n, n)
            done += [(a, kv[0]) for a in q] if uses_first_kv_chunk(t, i) else [(q[1], b) for b in kv]
        assert all(b <= a for a, b in done), "a fully masked block was computed"
        work.append(len(done))
        seen += done
    need = [(a, b) for a in range(2 * n) for b in range(a + 1)]
    assert sorted(seen) == need
    assert max(work) / np.mean(work) <= 1.05, work


@pytest.mark.parametrize("n,tokens", [(1, 40), (2, 64), (4, 48), (8, 16), (3, 30)])
def test_pages_spread_evenly_over_the_seq_devices(n, tokens):
    """A request's logical page j comes from seq device j % n: whatever its length, no device holds more than
    one page more than another, and freeing gives every page back."""
    from jaxpar.serving.pages import PagePool
    pool = PagePool(batch_shards=1, seq_shards=n, pages_per_block=16)
    count = -(-tokens // 4)
    assert pool.can_allocate(0, 0, count)
    pages = pool.allocate(0, 0, count)
    held = pool.refs[0].sum(axis=1)
    assert held.sum() == count and held.max() - held.min() <= 1
    assert all(pool.refs[0, j % n, p] == 1 for j, p in enumerate(pages))
    pool.release(0, pages)
    assert pool.in_use() == 0 and pool.free_pages(0) == 16 * n
    s = 8 * n  # the prompt's zigzag order: device 0 holds chunks 0 and 2n-1 of 2n
    assert np.array_equal(zigzag.order(s, n)[:s // n], np.concatenate(
        [np.arange(c * 4, (c + 1) * 4) for c in zigzag.chunks(0, n)]))


# ---- same answers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SEQ_MESHES + list(INLINE))
@pytest.mark.parametrize("length", [32, 37])  # divides every 2N, and does not
def test_long_prompt_logits_match_single(name, length):
    tokens = np.random.RandomState(length).randint(0, 512, (3, length))
    want, got = long_engine("single").logits(tokens), long_engine(name).logits(tokens)
    assert np.abs(got - want).max() <= 1e-4, name


@pytest.mark.parametrize("name", SEQ_MESHES + ["sp4_dense", "sp2_tp4_nvsp"])
def test_long_generation_matches_single(name):
    """Prompts of different lengths (one of 100 tokens), 24 new tokens: the cache fills across all devices."""
    rs = np.random.RandomState(0)
    prompts = [list(rs.randint(0, 512, n)) for n in (100, 7, 61)]
    kw = dict(max_new_tokens=24, stop_at_eos=False)
    assert long_engine(name).generate_tokens(prompts, **kw) == long_engine("single").generate_tokens(prompts, **kw)


@pytest.mark.parametrize("name", ["sp4_dense", "tp2_nvsp"])
def test_inline_layouts_answer_the_default_model(name):
    eng = jaxpar.load(mesh=mesh_of(name))
    prompts = ["123+456=", "7+8=", "999+1="]
    assert eng.generate(prompts, max_new_tokens=6) == ["579", "15", "1000"]


# ---- compiled programs ---------------------------------------------------------------------------------
def _kv_block_bytes(eng, r, n):
    cfg = eng.config
    kv_local = cfg.kv_heads * eng.kv_repeat // eng.layout.size("kv_heads")
    return r["batch"] // eng.layout.size("batch") * r["prompt_len"] // n * kv_local * cfg.head_size * 4


@pytest.mark.parametrize("mesh,n", [("sp4", 4), ("sp8", 8), ("dp2_sp2_tp2", 2)])
def test_ring_prefill_moves_kv_blocks_around_the_ring_only(mesh, n):
    eng = engine(mesh)
    r = inspect_engine(eng, batch=4, prompt_len=32)
    layers = eng.config.num_hidden_layers
    c = r["prefill"]["collectives"]
    assert c["collective-permute"]["count"] == layers * (n - 1) * 2
    assert c["collective-permute"]["bytes"] == layers * (n - 1) * 2 * _kv_block_bytes(eng, r, n)
    # attention gathers no K/V; the paged cache gathers each layer's K and V (interleaved, one array) once for
    # its page writes (each device writes the pages it owns), and sampling gathers the vocab-split logits (with
    # tensor)
    gathers = 1 if eng.layout.size("vocab") > 1 else 0
    assert c["all-gather"]["count"] == layers + gathers and c["all-to-all"]["count"] == 0
    logits = gathers * r["batch"] // eng.layout.size("batch") * eng.config.vocab_size * 4
    assert c["all-gather"]["bytes"] == 2 * layers * n * _kv_block_bytes(eng, r, n) + logits


def test_dense_attention_on_a_split_sequence_gathers_kv():
    """The baseline the kernels avoid: XLA's own attention on a split sequence gathers K and V."""
    eng = jaxpar.load(mesh=mesh_of("sp4_dense"))
    c = inspect_engine(eng, batch=4, prompt_len=32)["prefill"]["collectives"]
    assert c["all-gather"]["count"] >= 2 * eng.config.num_hidden_layers
    assert c["collective-permute"]["count"] == 0


def test_ulysses_does_two_all_to_alls_per_layer():
    eng = engine("sp4_ulysses")
    r = inspect_engine(eng, batch=4, prompt_len=32)
    cfg, n = eng.config, 4
    layers, kv = cfg.num_hidden_layers, cfg.kv_heads * eng.kv_repeat
    c = r["prefill"]["collectives"]
    assert c["all-to-all"]["count"] == 2 * layers
    tokens = r["batch"] * r["prompt_len"] // n
    qkv, out = tokens * (cfg.num_attention_heads + 2 * kv) * cfg.head_size * 4, tokens * cfg.num_attention_heads * cfg.head_size * 4
    assert c["all-to-all"]["bytes"] == layers * (qkv + out)
    assert c["collective-permute"]["count"] == 0
    assert c["all-gather"]["count"] == layers  # the paged cache's K and V (interleaved), gathered for the page writes


@pytest.mark.parametrize("mesh,n", [("sp4", 4), ("sp8", 8), ("sp4_ulysses", 4), ("dp2_sp2_tp2", 2)])
def test_decode_merges_partial_attention_and_splits_the_cache(mesh, n):
    eng = engine(mesh)
    r = inspect_engine(eng, batch=4, prompt_len=16, max_new_tokens=16)
    cfg = eng.config
    layers = cfg.num_hidden_layers
    c = r["decode"]["collectives"]
    tp = eng.layout.size("heads")
    # per layer: one max and one sum over seq (FlashDecoding across devices), plus tensor's two all-reduces,
    # plus the decode loop's condition over a data split
    expect = layers * 2 + ((2 * layers + 1) if tp > 1 else 0) + (eng.layout.size("batch") > 1)
    assert c["all-reduce"]["count"] == expect, c
    assert c["collective-permute"]["count"] == c["all-to-all"]["count"] == 0
    ref = inspect_engine(engine("single"), batch=4, prompt_len=16, max_new_tokens=16)
    # KV cache per device: a request's pages spread over seq (page j on device j mod n), so a device holds
    # ceil(pages / n) of each; split over tensor and data; kv heads replicated only where the tensor split needs
    # it (Ulysses repeats tiny-add's 2 kv heads for its all-to-all over 4 devices; the cache keeps one copy)
    pages = r["cache_len"] // r["page_size"]
    split = eng.layout.size("kv_heads") * eng.layout.size("batch") * pages
    cached = cache_kv_heads(cfg, eng.kv_repeat, eng.layout) // cfg.kv_heads
    assert (eng.kv_repeat, cached) == ((2, 1) if mesh == "sp4_ulysses" else (eng.kv_repeat, eng.kv_repeat))
    assert r["kv_cache_bytes_per_device"] * split == ref["kv_cache_bytes_per_device"] * cached * -(-pages // n)


def test_nvidia_sequence_parallelism_turns_all_reduces_into_reduce_scatters():
    eng = jaxpar.load(mesh=mesh_of("tp2_nvsp"))
    r = inspect_engine(eng, batch=2, prompt_len=32)
    cfg, t = eng.config, 2
    full = r["batch"] * r["prompt_len"] * cfg.hidden_size * 4
    c = r["prefill"]["collectives"]
    assert c["reduce-scatter"] == {"count": 2 * cfg.num_hidden_layers, "bytes": 2 * cfg.num_hidden_layers * full // t}
    assert c["all-reduce"]["count"] == 2  # embedding and last-token pick; no per-layer all-reduce left
    # decode has one token per row, nothing to split: tensor parallelism's all-reduces as usual
    assert r["decode"]["collectives"]["all-reduce"]["count"] == 2 * cfg.num_hidden_layers + 1


def test_prefill_memory_per_device_falls_with_n(monkeypatch):
    """A 1024-token prefill: ring attention's per-device peak falls with N from dense attention's on one
    device; one device's blockwise attention (the default there) needs a fraction of dense's."""
    from jaxpar.analysis.hlo import report
    from jaxpar.engine.engine import compile_steps
    from jaxpar.parallel import attention

    def peak(name, axes):
        """The prefill program of one 1024-token prompt (its decode loop is not needed)."""
        eng = jaxpar.load(mesh=parse_mesh({"axes": axes, "attention": "ring"}, name), model=LONG)
        return report(compile_steps(eng, 1, 1024, 16, decode=False)["prefill"])["memory"]["peak_bytes"]
    blockwise = peak("single", {})
    with monkeypatch.context() as m:
        m.setattr(attention, "BLOCK_MIN", 10 ** 9)
        peaks = [peak("single", {})]
    peaks += [peak(f"sp{n}", {"seq": n}) for n in (2, 4, 8)]
    assert all(a > 1.5 * b for a, b in zip(peaks, peaks[1:])), peaks
    assert blockwise < peaks[0] / 4, (blockwise, peaks[0])


# ---- refused layouts -----------------------------------------------------------------------------------
def test_ulysses_heads_must_divide():
    cfg = long_engine("single").config.replace(num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(LayoutError, match=r"ulysses.*seq=8.*num_attention_heads=4.*not divisible by 8"):
        jaxpar.load(mesh=parse_mesh({"axes": {"seq": 8}, "attention": "ulysses"}, "u8.yaml"), model=cfg)


def test_residual_split_must_match_the_contraction():
    bad = parse_mesh({"axes": {"tensor": 2}, "rules": {"residual_seq": "tensor", "heads": None}}, "bad.yaml")
    with pytest.raises(LayoutError, match=r"bad.yaml: rules: residual_seq.*heads is split over \[\]"):
        jaxpar.load(mesh=bad)
    with pytest.raises(LayoutError, match=r"residual_seq -> \['tensor'\] must start with the seq axes \['seq'\]"):
        jaxpar.load(mesh=parse_mesh({"axes": {"seq": 2, "tensor": 2}, "rules": {"residual_seq": "tensor"}}, "b2"))
