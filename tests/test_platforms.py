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
        # 16-token prompts of head_dim 16: too small for the kernels' 128 tiles, and named so
        why = {"tpu": "splash: head_dim 16 is not a multiple of 128",
               "cuda": "pallas-flash: a 16-token chunk is not a multiple of 128"}[platform]
        assert progs["prefill"]["attention"] == (mesh_cfg.attention if seq else f"dense (not {why})"), name
        assert progs["decode"]["attention"] == ("paged-gather+seq-merge" if seq else "paged-gather"), name
        written = progs["prefill"]["collectives"]
        if seq and mesh_cfg.attention == "ring":
            assert written["collective-permute"] >= 2, name  # K and V blocks around the ring
        if seq and mesh_cfg.attention == "ulysses":
            assert written["all-to-all"] == 2, name
        if mesh_cfg.size("stage") > 1:
            assert written["collective-permute"] >= 1, name  # activations to the next stage
            assert r["layers"] == f"scanned, {mesh_cfg.size('stage')} pipeline stages"
        else:
            assert r["layers"] == "scanned"


def test_inspect_platform_reports_a_real_shape_without_its_devices(capsys):
    """Llama-3-8B on 8 TPUs from its config alone (nothing allocated): a 1024-token prompt runs the splash
    kernel (a Pallas TPU custom call) inside the tensor-parallel program, and inside a pipeline's stages; on
    CUDA the Pallas GPU flash kernel (a Triton custom call); a mesh with a -1 axis needs --devices, which then
    sizes it."""
    for mesh in ("tp8", "pp2_tp4"):
        inspect_cli.main(["--platform", "tpu", "--mesh", mesh, "--model", "llama3-8b", "--prompt-len", "1024",
                          "--json"])
        r = json.loads(capsys.readouterr().out)
        assert r["devices"] == 8 and r["dtype"] == "bfloat16"
        assert r["programs"]["prefill"]["attention"] == "splash"
        assert r["programs"]["prefill"]["custom_calls"] == {"tpu_custom_call": 1}
        assert r["programs"]["decode"]["custom_calls"] == {}
        assert r["programs"]["prefill"]["collectives"]["all-reduce"] >= 1  # the vocab-parallel embedding
    inspect_cli.main(["--platform", "cuda", "--mesh", "tp8", "--model", "llama3-8b", "--prompt-len", "1024",
                      "--json"])
    prefill = json.loads(capsys.readouterr().out)["programs"]["prefill"]
    assert prefill["attention"] == "pallas-flash" and prefill["custom_calls"] == {"__gpu$xla.gpu.triton": 1}
    inspect_cli.main(["--platform", "cuda", "--mesh", "tp2", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert out.startswith("lowered for cuda: mesh tensor=2 (2 devices), float32, layers scanned")
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


@pytest.mark.parametrize("platform,window,softcap,scale", [
    ("tpu", None, None, None), ("tpu", 100, None, None), ("tpu", None, 30.0, 0.2), ("cuda", None, None, 0.2)])
def test_prefill_kernels_give_the_xla_answer_in_interpret_mode(platform, window, softcap, scale):
    """Each platform's prefill kernel (Pallas interpret mode on this CPU) against the XLA attention every other
    path uses, with grouped queries (4 heads, 2 kv): TPU splash causal, with a sliding window, and with
    soft-capped scores and a query scale; the GPU flash kernel causal with a query scale."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpar.model.attend import AttentionSpec, attend
    from jaxpar.parallel import prefill_kernels

    b, s, h, kv, d = 2, 256, 4, 2, 128
    q, k, v = (jax.random.normal(jax.random.key(i), (b, s, n, d), jnp.float32) for i, n in enumerate((h, kv, kv)))
    spec = AttentionSpec(window=window, softcap=softcap, scale=scale)
    assert prefill_kernels.unfit(platform, s, d, spec, sinks=False) is None
    pos = np.arange(s)
    want = attend(q, k, v, jnp.broadcast_to(spec.visible(pos[:, None], pos[None, :]), (b, s, s)), spec)
    got = prefill_kernels.local(platform, q, k, v, spec=spec, interpret=True)
    assert float(jnp.abs(got - want).max()) <= 2e-5


def test_what_the_kernels_cannot_take_is_named():
    from jaxpar.model.attend import AttentionSpec
    from jaxpar.parallel.prefill_kernels import unfit

    causal = AttentionSpec()
    assert unfit("cpu", 256, 128, causal, sinks=False) == "no kernel on cpu"
    assert unfit("tpu", 256, 128, causal, sinks=True) == "attention sinks"
    assert unfit("tpu", 256, 576, AttentionSpec(latent=True), sinks=False) == "MLA's latent cache"
    assert unfit("tpu", 256, 64, causal, sinks=False) == "head_dim 64 is not a multiple of 128"
    assert unfit("tpu", 200, 128, causal, sinks=False) == "a 200-token chunk is not a multiple of 128"
    assert unfit("cuda", 256, 64, causal, sinks=False) is None
    assert unfit("cuda", 256, 64, AttentionSpec(window=8), sinks=False) == \
        "a sliding window (the GPU kernel is causal only)"
    assert unfit("cuda", 256, 64, AttentionSpec(softcap=50.0), sinks=False) == "soft-capping"
