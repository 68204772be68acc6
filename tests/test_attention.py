"""Blockwise causal prefill attention (model/attend.causal_blockwise): the answer of dense attention without
its [S, S] score matrix, on one device and under every kind of layout that runs it (no `seq` axis), with
the collectives the planner predicts."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpar
from conftest import engine, mesh_path
from jaxpar.inspect import inspect_engine
from jaxpar.model.attend import AttentionSpec, attend, causal_blockwise
from jaxpar.parallel import attention as A
from test_plan import assert_close, predicted

LONG = "tiny-long"


# sliding windows shorter than a block, across a block edge and of several blocks; soft-capping and a scale
SPECS = {"causal": AttentionSpec(), "window5": AttentionSpec(window=5),
         "window40_capped": AttentionSpec(window=40, softcap=3.0, scale=0.2), "window100": AttentionSpec(window=100)}


def dense_reference(q, k, v, q_pos, k_pos, spec):
    """The answer straight from the definition, in numpy (float64): softmax over the visible keys of
    capped, scaled scores."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, h, d = q.shape
    g = h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    sc = np.einsum("bshd,bthd->bhst", q, k) * (d ** -0.5 if spec.scale is None else spec.scale)
    if spec.softcap:
        sc = spec.softcap * np.tanh(sc / spec.softcap)
    q_pos, k_pos = np.asarray(q_pos)[:, :, None], np.asarray(k_pos)[:, None, :]
    vis = (k_pos <= q_pos) & ((k_pos > q_pos - spec.window) if spec.window else True)
    sc = np.where(vis[:, None], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    return np.einsum("bhst,bthd->bshd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("s,block,heads,kv", [(64, 16, 8, 2), (96, 32, 4, 4), (128, 128, 6, 1), (256, 32, 8, 8),
                                              (100, 32, 8, 2), (20, 32, 4, 1)])
def test_blockwise_is_dense_attention(s, block, heads, kv, spec):
    """Every block count (one block included, and prompts padded up to a block), MHA, GQA and MQA; rows past
    the diagonal see nothing later, and with a window nothing before it (blocks before it skipped)."""
    spec = SPECS[spec]
    r = np.random.RandomState(s + heads)
    q = jnp.asarray(r.randn(2, s, heads, 16) * 2, jnp.float32)
    k, v = (jnp.asarray(r.randn(2, s, kv, 16) * 2, jnp.float32) for _ in range(2))
    pos = np.broadcast_to(np.arange(s), (2, s))
    want = dense_reference(q, k, v, pos, pos, spec)
    np.testing.assert_allclose(np.asarray(attend(q, k, v, spec.visible(pos[:, :, None], pos[:, None, :]), spec)),
                               want, atol=2e-5, rtol=0)
    got = jax.jit(causal_blockwise, static_argnums=(3, 4))(q, k, v, block, spec)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mesh", ["sp4", "sp4_ulysses", "sp8"])
@pytest.mark.parametrize("spec", ["causal", "window5", "window40_capped"])
def test_sequence_parallel_prefill_kernels_follow_the_spec(mesh, spec):
    """Ring (sp4, sp8) and Ulysses (sp4_ulysses) prefill over a zigzag-split prompt give the definition's answer
    under a sliding window (ring skips the block pairs a window hides), soft-capping and a scale."""
    from jaxpar.layout.rules import activate
    from jaxpar.parallel import zigzag
    spec = SPECS[spec]
    lay = engine(mesh).layout
    n = lay.size("seq")
    s = 16 * n
    r = np.random.RandomState(n)
    q = jnp.asarray(r.randn(2, s, 8, 16) * 2, jnp.float32)
    k, v = (jnp.asarray(r.randn(2, s, 8, 16) * 2, jnp.float32) for _ in range(2))
    pos = np.broadcast_to(zigzag.order(s, n), (2, s))
    with activate(lay):
        got = jax.jit(lambda *a: A.prefill_attention(*a, spec))(q, k, v, jnp.asarray(pos, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), dense_reference(q, k, v, pos, pos, spec), atol=2e-5, rtol=0)


def test_block_size_choice():
    assert A.block_size(256) is None  # short prompts: dense
    assert A.block_size(512) == 128 and A.block_size(640) == 256 and A.block_size(4096) == 256


def _dense_reference(monkeypatch):
    """`single` with blockwise attention switched off (a fresh engine, traced with the threshold raised)."""
    monkeypatch.setattr(A, "BLOCK_MIN", 10 ** 9)
    assert A.block_size(512) is None  # the reference really runs dense attention
    eng = jaxpar.load(mesh=mesh_path("single"), model=LONG)
    tokens = np.random.RandomState(1).randint(0, 512, (2, 512))
    prompts = [list(np.random.RandomState(2).randint(0, 512, 300))]
    return tokens, prompts, (eng.logits(tokens), eng.generate_tokens(prompts, max_new_tokens=8, stop_at_eos=False))


@pytest.fixture(scope="module")
def reference():
    mp = pytest.MonkeyPatch()
    try:
        return _dense_reference(mp)
    finally:
        mp.undo()


@pytest.mark.parametrize("mesh", ["single", "dp2_tp4", "pp2"])  # pp2_tp4: its collectives below
def test_long_prompts_give_the_dense_answer(mesh, reference):
    """512-token logits, 600-token logits (padded to 768 inside the kernel) and a 300-token prompt's greedy
    tokens (a 512-token bucket) equal dense attention's (on pp2 the logits: the blockwise kernel inside the
    pipeline's stages; its decode is the one tests/test_pipeline.py checks)."""
    tokens, prompts, (logits, generated) = reference
    eng = engine(mesh, model=LONG)
    assert np.abs(eng.logits(tokens) - logits).max() <= 1e-4
    if mesh == "single":
        with pytest.MonkeyPatch.context() as m:
            long = np.random.RandomState(3).randint(0, 512, (1, 600))
            blockwise = jaxpar.load(mesh=mesh_path("single"), model=LONG).logits(long)
            m.setattr(A, "BLOCK_MIN", 10 ** 9)
            dense = jaxpar.load(mesh=mesh_path("single"), model=LONG).logits(long)
        assert np.abs(blockwise - dense).max() <= 1e-4
    if mesh != "pp2":
        assert eng.generate_tokens(prompts, max_new_tokens=8, stop_at_eos=False) == generated


@pytest.mark.parametrize("mesh", ["tp4", "pp2_tp4"])
def test_blockwise_prefill_moves_what_the_planner_predicts(mesh):
    """The loops over blocks add no collective: prefill of a 300-token prompt (512 bucket) on tensor and
    pipeline layouts has exactly the planner's collectives."""
    eng = engine(mesh, model=LONG)
    r = inspect_engine(eng, batch=2, prompt_len=300, max_new_tokens=8)
    assert A.block_size(r["prompt_len"])
    assert_close(predicted(eng, r), r, mesh)


@pytest.mark.parametrize("spec", ["causal", "window300_capped"])
@pytest.mark.parametrize("mesh", ["single", "sp4"])
def test_paged_attention_over_a_wide_table_is_dense_attention(mesh, spec):
    """A page table wider than one block (parallel/paged.BLOCK_TOKENS) is read block by block up to the last
    filled page: rows of different lengths (one near the table's end, whose width is not a multiple of the
    block, one in its first page, one padding row), one new token (decode) and a 40-token later chunk, and a
    call whose rows reach no page of most seq devices, give dense attention's answer over the same keys; over
    `seq` each device reads its own pages and the partial results merge. With a sliding window the blocks
    before every row's window are skipped (the call of two rows near the end starts past its first blocks)."""
    from jaxpar.layout.rules import activate
    spec = AttentionSpec(window=300, softcap=4.0, scale=0.3) if spec == "window300_capped" else AttentionSpec()
    from jaxpar.parallel.paged import BLOCK_TOKENS, paged_attention
    page, nb, kv, h, d = 16, 120, 2, 4, 16
    assert nb * page >= 7 * BLOCK_TOKENS and nb % (BLOCK_TOKENS // page)  # several blocks, the last one partial
    r = np.random.RandomState(7)
    b = 4
    pool = jnp.asarray(r.randn(b * nb, page, 2 * kv, d), jnp.float32)  # keys and values interleaved by head
    table = jnp.asarray(r.permutation(b * nb).reshape(b, nb), jnp.int32)
    lay = None if mesh == "single" else engine(mesh).layout.for_decode()
    if lay is not None:  # each seq device's pool holds its own pages: page j of a row lives on device j % n
        n = lay.size("cache_seq")
        pool_in = jnp.concatenate([pool[table[:, i::n]].reshape(b * nb // n, page, 2 * kv, d) for i in range(n)])
        table_in = jnp.asarray(np.arange(nb)[None, :] // n + np.arange(b)[:, None] * (nb // n), jnp.int32)
    else:
        pool_in, table_in = pool, table
    for ends, s in (([1870, 300, 10, 0], 1), ([1870, 300, 10, 0], 40), ([0, 0, 10, 0], 1), ([1870, 1500, 0, 0], 3)):
        ends = np.array(ends)  # new tokens start here; 0 marks a padding row
        q = jnp.asarray(r.randn(b, s, h, d), jnp.float32)
        k, v = (jnp.asarray(r.randn(b, s, kv, d), jnp.float32) for _ in range(2))
        positions = jnp.asarray(ends[:, None] + np.arange(s)[None, :], jnp.int32)
        valid = jnp.asarray(np.broadcast_to((ends > 0)[:, None], (b, s)))
        # the reference: the new K/V written into a contiguous copy of each row's pages, then dense attention
        rows_kv = pool[table].reshape(b, nb * page, 2 * kv, d)
        ck, cv = rows_kv[:, :, 0::2], rows_kv[:, :, 1::2]
        rows = np.arange(b)[:, None]
        ck, cv = ck.at[rows, positions].set(k), cv.at[rows, positions].set(v)
        key_pos = np.broadcast_to(np.arange(nb * page), (b, nb * page))
        want = dense_reference(q, ck, cv, positions, key_pos, spec)[ends > 0]
        with activate(lay) if lay is not None else contextlib.nullcontext():
            # a fresh function each time: jit's trace cache does not know the active layout
            got, _ = jax.jit(lambda *a: paged_attention(*a, spec))(q, k, v, pool_in, table_in, positions, valid)
        np.testing.assert_allclose(np.asarray(got)[ends > 0], want, atol=2e-5, rtol=0)
