"""Accelerators without an accelerator: every shipped mesh's programs lower for TPU and for CUDA on devices that
are not here (an AbstractMesh), as those platforms would run them (scanned layers, bfloat16), `inspect
--platform` reports them, and the platforms' prefill kernels give the XLA path's answers in interpret mode."""
import json
import os

import pytest

from conftest import ROOT, mesh_path
from jaxpar import inspect as inspect_cli
from jaxpar.api import model_config
from jaxpar.engine.lowering import custom_calls, lower_for
from jaxpar.errors import JaxparError
from jaxpar.layout.mesh_file import load_mesh_file, parse_mesh

SHIPPED = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "meshes")) if f.endswith(".yaml"))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_every_shipped_mesh_lowers_for_the_platform(platform):
    """The first prompt chunk, a later chunk over the paged cache and the decode loop lower for every shipped
    mesh (the default model of each: tiny-add-moe with an expert axis), in bfloat16 with scanned layers; the
    report names the attention each runs and the collectives the sequence and pipeline kernels write."""
    assert len(SHIPPED) == 16
    for name in SHIPPED:
        mesh_cfg = load_mesh_file(mesh_path(name))
        cfg = model_config(mesh_cfg)[0].replace(dtype="bfloat16")
        r = lower_for(platform, mesh_cfg, cfg)
        assert r["platform"] == platform and r["devices"] == mesh_cfg.device_count and r["dtype"] == "bfloat16"
        progs = r["programs"]
        assert set(progs) == {"prefill", "chunked_prefill", "decode"}, name
        seq = mesh_cfg.size("seq") > 1
        # head_dim 16: too narrow for TPU's 128-lane tiles, and named so; the GPU kernel takes the 16-token
        # prompt padded to its 128-token block
        kernel = {"tpu": "dense (not splash: head_dim 16 is not a multiple of 128)", "cuda": "pallas-flash"}[platform]
        assert progs["prefill"]["attention"] == (mesh_cfg.attention if seq else kernel), name
        paged = {"tpu": "paged-gather (not ragged-paged: head_dim 16 is not a multiple of 128)",
                 "cuda": "paged-gather"}[platform]
        assert progs["decode"]["attention"] == ("paged-gather+seq-merge" if seq else paged), name
        written = progs["prefill"]["collectives"]
        if seq and mesh_cfg.attention == "ring":
            assert written["collective-permute"] >= 2, name  # K and V blocks around the ring
        if seq and mesh_cfg.attention == "ulysses":
            assert written["all-to-all"] == 2, name
        for prog in progs.values():  # shipped expert meshes are dropless: ragged exchange, no capacity buffers
            if mesh_cfg.size("expert") > 1:
                assert prog["experts"] == "ragged-all-to-all" and "all-to-all" not in prog["collectives"], name
                assert prog["custom_calls"]["ragged_all_to_all"] == 2, name  # there and back, one scanned layer
            else:
                assert prog["experts"] == "none" and "ragged_all_to_all" not in prog["custom_calls"], name
        if mesh_cfg.size("stage") > 1:
            assert written["collective-permute"] >= 1, name  # activations to the next stage
            assert r["layers"] == f"scanned, {mesh_cfg.size('stage')} pipeline stages"
        else:
            assert r["layers"] == "scanned"


def test_inspect_platform_reports_a_real_shape_without_its_devices(capsys):
    """Llama-3-8B on 8 TPUs from its config alone (nothing allocated): a 1024-token prompt runs the splash
    kernel (a Pallas TPU custom call) inside the tensor-parallel program, and inside a pipeline's stages, and
    decode runs the ragged paged attention kernel over the pages; on CUDA the Pallas GPU flash kernel (a Triton
    custom call) for the prompt, XLA's gathered pages in decode; a mesh with a -1 axis needs --devices, which
    then sizes it."""
    for mesh in ("tp8", "pp2_tp4"):
        inspect_cli.main(["--platform", "tpu", "--mesh", mesh, "--model", "llama3-8b", "--prompt-len", "1024",
                          "--json"])
        r = json.loads(capsys.readouterr().out)
        assert r["devices"] == 8 and r["dtype"] == "bfloat16"
        assert r["programs"]["prefill"]["attention"] == "splash"
        assert r["programs"]["prefill"]["custom_calls"] == {"tpu_custom_call": 1}
        for paged in ("chunked_prefill", "decode"):
            assert r["programs"][paged]["attention"] == "ragged-paged"
            assert r["programs"][paged]["custom_calls"] == {"tpu_custom_call": 1}
        assert r["programs"]["prefill"]["collectives"]["all-reduce"] >= 1  # the vocab-parallel embedding
    inspect_cli.main(["--platform", "cuda", "--mesh", "tp8", "--model", "llama3-8b", "--prompt-len", "1024",
                      "--json"])
    progs = json.loads(capsys.readouterr().out)["programs"]
    assert progs["prefill"]["attention"] == "pallas-flash"
    assert progs["prefill"]["custom_calls"] == {"__gpu$xla.gpu.triton": 1}
    assert progs["decode"]["attention"] == "paged-gather" and progs["decode"]["custom_calls"] == {}
    inspect_cli.main(["--platform", "cuda", "--mesh", "tp2", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert out.startswith("lowered for cuda: mesh tensor=2 (2 devices), float32 (weights float32, KV cache float32), "
                          "layers scanned")
    wide = parse_mesh({"axes": {"data": -1, "tensor": 4}}, "dp_tp4")
    with pytest.raises(JaxparError, match=r"dp_tp4: axes: a -1 axis needs a device count to lower for tpu"):
        lower_for("tpu", wide, model_config(wide)[0])
    assert lower_for("tpu", wide, model_config(wide)[0], devices=32)["mesh"] == {"data": 8, "tensor": 4}


def test_custom_calls_are_read_from_the_module_text():
    """The report's kernels: custom calls other than the partitioner's sharding annotations."""
    text = ('%0 = stablehlo.custom_call @Sharding(%arg0) : ...\n'
            '%1 = stablehlo.custom_call @tpu_custom_call(%0) {backend_config = ""} : ...\n'
            '%2 = "stablehlo.custom_call"(%1) {call_target_name = "__gpu$xla.gpu.triton"} : ...\n')
    assert custom_calls(text) == {"tpu_custom_call": 1, "__gpu$xla.gpu.triton": 1}


@pytest.mark.parametrize("platform,window,softcap,scale,s", [
    ("tpu", None, None, None, 256), ("tpu", 100, None, None, 200), ("tpu", None, 30.0, 0.2, 256),
    ("cuda", None, None, 0.2, 200)])
def test_prefill_kernels_give_the_xla_answer_in_interpret_mode(platform, window, softcap, scale, s):
    """Each platform's prefill kernel (Pallas interpret mode on this CPU) against the XLA attention every other
    path uses, with grouped queries (4 heads, 2 kv): TPU splash causal, with a sliding window, and with
    soft-capped scores and a query scale; the GPU flash kernel causal with a query scale. A 200-token chunk is
    padded to the kernels' 256 and gives the same answer."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpar.model.attend import AttentionSpec, attend
    from jaxpar.parallel import prefill_kernels

    b, h, kv, d = 2, 4, 2, 128
    q, k, v = (jax.random.normal(jax.random.key(i), (b, s, n, d), jnp.float32) for i, n in enumerate((h, kv, kv)))
    spec = AttentionSpec(window=window, softcap=softcap, scale=scale)
    assert prefill_kernels.unfit(platform, d, spec, sinks=False) is None
    pos = np.arange(s)
    want = attend(q, k, v, jnp.broadcast_to(spec.visible(pos[:, None], pos[None, :]), (b, s, s)), spec)
    got = prefill_kernels.local(prefill_kernels.KERNELS[platform], q, k, v, spec=spec, interpret=True)
    assert float(jnp.abs(got - want).max()) <= 2e-5


def test_what_the_kernels_cannot_take_is_named():
    from jaxpar.model.attend import AttentionSpec
    from jaxpar.parallel.prefill_kernels import unfit

    causal = AttentionSpec()
    assert unfit("cpu", 128, causal, sinks=False) == "no kernel on cpu"
    assert unfit("tpu", 128, causal, sinks=True) == "attention sinks"
    assert unfit("tpu", 576, AttentionSpec(latent=True), sinks=False) == "MLA's latent cache"
    assert unfit("tpu", 64, causal, sinks=False) == "head_dim 64 is not a multiple of 128"
    assert unfit("cuda", 64, causal, sinks=False) is None
    assert unfit("cuda", 64, AttentionSpec(window=8), sinks=False) == \
        "a sliding window (the GPU kernel is causal only)"
    assert unfit("cuda", 64, AttentionSpec(softcap=50.0), sinks=False) == "soft-capping"


@pytest.mark.parametrize("window,softcap,scale", [(None, None, None), (40, 20.0, 0.2)])
def test_ragged_paged_kernel_arguments_give_the_xla_answer(window, softcap, scale):
    """The TPU decode kernel cannot run here (interpret mode stops on its reshape of a DMA'd buffer), so the
    rows are packed into its ragged layout and handed to the kernel's own reference
    (`ref_ragged_paged_attention`, same arguments): decode (one token per row, a padding row) and a later
    prompt chunk (rows of 5, 12 and 0 valid tokens out of 12) over scattered pages with grouped queries, a
    sliding window and soft-capping give the XLA gathered-pages answer. A kv length one short (the row's newest
    token unseen) would not."""
    import jax.numpy as jnp
    import numpy as np

    from jaxpar.model.attend import AttentionSpec
    from jaxpar.parallel import decode_kernels
    from jaxpar.parallel.paged import cache_entries, paged_attention

    b, nb, page, h, kv, d = 3, 8, 16, 4, 2, 32
    r = np.random.RandomState(3)
    spec = AttentionSpec(window=window, softcap=softcap, scale=scale)
    pool = jnp.asarray(r.randn(b * nb, page, 2 * kv, d), jnp.float32)
    table = jnp.asarray(r.permutation(b * nb).reshape(b, nb), jnp.int32)
    for starts, lengths, s in (([70, 3, 0], [1, 1, 0], 1), ([100, 20, 0], [5, 12, 0], 12)):
        q = jnp.asarray(r.randn(b, s, h, d), jnp.float32)
        k, v = (jnp.asarray(r.randn(b, s, kv, d), jnp.float32) for _ in range(2))
        positions = jnp.asarray(np.array(starts)[:, None] + np.arange(s)[None, :], jnp.int32)
        valid = jnp.asarray(np.arange(s)[None, :] < np.array(lengths)[:, None])
        want, written = paged_attention(q, k, v, pool, table, positions, valid, spec)
        got = decode_kernels.ragged_paged(q, written, table, positions, valid, spec, reference=True)
        assert float(jnp.abs(got - want)[valid].max()) <= 2e-5
        unseen = decode_kernels.ragged_paged(q, written, table, positions - 1, valid, spec, reference=True)
        assert float(jnp.abs(unseen - want)[valid].max()) > 1e-2
    entries = cache_entries(k, v, pool)  # key of kv head i at 2i, its value at 2i + 1
    assert (entries[:, :, 0::2] == k).all() and (entries[:, :, 1::2] == v).all()


def test_what_the_decode_kernel_cannot_take_is_named():
    from jaxpar.model.attend import AttentionSpec
    from jaxpar.parallel.decode_kernels import unfit

    causal = AttentionSpec()
    assert unfit("tpu", 128, 4, 1, causal, sinks=False, dtype="bfloat16") is None
    assert unfit("tpu", 128, 32, 8, AttentionSpec(window=4096, softcap=50.0), sinks=False, dtype="bfloat16") is None
    assert unfit("cuda", 128, 4, 1, causal, sinks=False, dtype="bfloat16") == "no kernel on cuda"
    assert unfit("tpu", 128, 4, 1, causal, sinks=True, dtype="bfloat16") == "attention sinks"
    assert unfit("tpu", 576, 16, 1, AttentionSpec(latent=True), sinks=False, dtype="bfloat16") == \
        "MLA's latent cache"
    assert unfit("tpu", 64, 4, 1, causal, sinks=False, dtype="bfloat16") == "head_dim 64 is not a multiple of 128"
    assert unfit("tpu", 128, 6, 3, causal, sinks=False, dtype="bfloat16") == \
        "3 kv heads per device cannot be tiled (1, 2, 4, 8 or a multiple of 8 in bfloat16)"


@pytest.mark.parametrize("window", [None, 100])
def test_cudnn_is_chosen_where_present_and_its_call_is_the_xla_answer(monkeypatch, window):
    """Where cuDNN is present (it is not here: `cudnn_available()` is False on CPU), a bfloat16 prompt chunk on
    CUDA runs cuDNN's fused attention, and what cuDNN does not take (soft-capping, float32) the Pallas kernel;
    the cuDNN call's arguments (query scale applied first, causal, the window as (window - 1, 0)) run through
    XLA's implementation give the XLA path's answer; lowered for CUDA, the program asks for cuDNN, which this
    machine cannot lower ("cuDNN is not detected")."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpar.model.attend import AttentionSpec, attend
    from jaxpar.parallel import prefill_kernels

    assert not prefill_kernels.cudnn_available()
    spec = AttentionSpec(window=window, scale=0.3)
    b, s, h, kv, d = 2, 256, 4, 2, 64
    assert prefill_kernels.choose("cuda", d, spec, False, "bfloat16", cudnn=True)[0] == "cudnn"
    assert prefill_kernels.choose("cuda", d, spec, False, "float32", cudnn=True)[0] == (
        "pallas-flash" if window is None else None)
    assert prefill_kernels.choose("cuda", d, AttentionSpec(softcap=5.0), False, "bfloat16", cudnn=True)[0] is None
    q, k, v = (jax.random.normal(jax.random.key(i), (b, s, n, d), jnp.float32) for i, n in enumerate((h, kv, kv)))
    pos = np.arange(s)
    want = attend(q, k, v, jnp.broadcast_to(spec.visible(pos[:, None], pos[None, :]), (b, s, s)), spec)
    got = prefill_kernels.local("cudnn", q, k, v, spec=spec, interpret=True)
    assert float(jnp.abs(got - want).max()) <= 2e-5
    monkeypatch.setattr(prefill_kernels, "cudnn_available", lambda: True)  # as on a GPU with cuDNN
    mesh_cfg = load_mesh_file(mesh_path("tp2"))
    cfg = model_config(mesh_cfg)[0].replace(dtype="bfloat16")
    with pytest.raises(Exception, match="cuDNN"):
        lower_for("cuda", mesh_cfg, cfg, prompt_len=128)
