"""Dropless expert dispatch without capacity padding (parallel/ragged_experts.py): ragged_all_to_all's CPU
emulation against its documented semantics, the ragged kernel against the capacity-buffer kernel (biases,
gpt-oss's gate, a tensor split), whole engines forced onto the ragged path against `single` and the
all-to-all path, the TPU/CUDA lowering, and the planner's bytes."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from conftest import ROOT, engine, mesh_path
from jaxpar.analysis import comm as C
from jaxpar.api import model_config
from jaxpar.engine.engine import Engine
from jaxpar.engine.lowering import custom_calls
from jaxpar.layout.mesh_file import load_mesh_file, parse_mesh
from jaxpar.parallel import experts as X
from jaxpar.parallel.ragged_experts import emulated_ragged_all_to_all, ragged_local

MOE = os.path.join(ROOT, "configs", "tiny-moe.yaml")


def _mesh(shape, names):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def _emulate(operand, output, io, ss, oo, rs, ep):
    f = jax.shard_map(functools.partial(emulated_ragged_all_to_all, axis_name="x"), mesh=_mesh((ep,), ("x",)),
                      in_specs=(P("x"),) * 6, out_specs=P("x"))
    return np.asarray(jax.jit(f)(*map(jnp.asarray, (operand, output, io, ss, oo, rs)))).reshape(ep, -1)


def test_emulated_ragged_all_to_all_gives_the_documented_result():
    """jax.lax.ragged_all_to_all's docstring example (2 devices), by hand; a wrong output offset moves the
    rows; 4 devices with 2 slices per destination against a loop over the docstring's pseudocode."""
    args = ([1, 2, 2, 3, 4, 0], [0] * 8, [0, 1, 0, 1], [1, 2, 1, 1], [0, 0, 1, 2], [1, 1, 2, 1])
    want = [[1, 3, 0, 0], [2, 2, 4, 0]]
    assert _emulate(*args, ep=2).tolist() == want
    wrong = list(args)
    wrong[4] = [0, 1, 1, 2]  # device 0's slice for device 1 written one row later
    assert _emulate(*wrong, ep=2).tolist() != want

    ep, per, n, m = 4, 2, 16, 18
    rng = np.random.RandomState(0)
    operand = rng.randint(1, 100, (ep, n)).astype(np.float32)
    sizes = rng.randint(0, 3, (ep, ep * per))  # [src, slice]: slice c goes to device c // per
    io = np.stack([np.cumsum(s) - s for s in sizes])  # each source's slices packed in order
    # receiver d keeps its slices from every source packed in (source, slice) order
    oo = np.zeros_like(sizes)
    for d in range(ep):
        cols = slice(d * per, (d + 1) * per)
        flat = sizes[:, cols].reshape(-1)
        oo[:, cols] = (np.cumsum(flat) - flat).reshape(ep, per)
    rs = np.stack([sizes[:, d * per:(d + 1) * per].reshape(-1) for d in range(ep)])  # [dst, (src, slice)]
    out = np.full((ep, m), -1.0, np.float32)
    want = out.copy()
    for src in range(ep):  # the docstring's SEND/RECEIVE loop
        for c in range(ep * per):
            d = c // per
            want[d, oo[src, c]:oo[src, c] + sizes[src, c]] = operand[src, io[src, c]:io[src, c] + sizes[src, c]]
    got = _emulate(operand.reshape(-1), out.reshape(-1), io.reshape(-1), sizes.reshape(-1), oo.reshape(-1),
                   rs.reshape(-1), ep)
    assert np.array_equal(got, want)


def _kernel_inputs(e=8, k=2, b=8, s=3, d=16, f=12):
    keys = jax.random.split(jax.random.key(0), 10)
    x = jax.random.normal(keys[0], (b, s, d))
    _, idx = jax.lax.top_k(jax.random.normal(keys[1], (b, s, e)), k)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (b, s, k)))
    valid = jax.random.uniform(keys[3], (b, s)) > 0.25
    shapes = {"w_gate": (e, d, f), "w_up": (e, d, f), "w_down": (e, f, d), "b_gate": (e, f), "b_up": (e, f),
              "b_down": (e, d)}
    w = {n: 0.3 * jax.random.normal(kk, sh) for kk, (n, sh) in zip(keys[4:], shapes.items())}
    return x, idx, weights, valid, w


def _run(body, inputs, ep=4, tp=2):
    mesh = _mesh((ep, tp), ("expert", "tensor"))
    tok, choice = P("expert", None, None), P("expert", None, None)
    wspec = {"w_gate": P("expert", None, "tensor"), "w_up": P("expert", None, "tensor"),
             "w_down": P("expert", "tensor", None), "b_gate": P("expert", "tensor"), "b_up": P("expert", "tensor"),
             "b_down": P("expert", None)}
    body = functools.partial(body, axis=("expert",), ep=ep, tensor_axes=("tensor",), token_axes=("expert",),
                             gate=X.Gate(limit=1.5))
    f = jax.shard_map(body, mesh=mesh, in_specs=(tok, choice, choice, P("expert", None), wspec),
                      out_specs=(tok, P()))
    out, stats = jax.jit(f)(*inputs)
    return np.asarray(out), np.asarray(stats)


def _shifted(*args, axis_name):
    """A broken exchange: every slice lands one row later than asked."""
    operand, output, io, ss, oo, rs = args
    return emulated_ragged_all_to_all(operand, output, io, ss, oo + 1, rs, axis_name=axis_name)


def test_ragged_kernel_equals_the_capacity_buffer_kernel():
    """Biases, gpt-oss's clamped gate, experts over 4 devices and their FFNs over 2, a quarter of the tokens
    padding: the ragged kernel gives the dropless capacity kernel's output and statistics; an exchange that
    writes one row off does not."""
    inputs = _kernel_inputs()
    t = inputs[0].shape[0] // 4 * inputs[0].shape[1]
    want, want_stats = _run(functools.partial(X._dispatch_local, cap=t), inputs)
    got, stats = _run(functools.partial(ragged_local, exchange=emulated_ragged_all_to_all), inputs)
    assert np.abs(got - want).max() <= 1e-5 and np.array_equal(stats, want_stats)
    assert stats[-1] == 0 and stats[:-1].sum() == 2 * int(inputs[3].sum())  # k per real token, none dropped
    bad, _ = _run(functools.partial(ragged_local, exchange=_shifted), inputs)
    assert np.abs(bad - want).max() > 1e-2


def _ragged_engine(mesh):
    """The all-to-all engine of `mesh` and the same model, weights and mesh forced onto the ragged path (on
    CPU devices: the emulated exchange)."""
    a = engine(mesh, model=MOE, unroll=False)  # scanned layers: one MoE layer to compile, not four
    ml = a.model_layout
    lay = dataclasses.replace(ml.layout, expert_dispatch="ragged")
    return a, Engine(a.config, dataclasses.replace(ml, layout=lay), a.params, a.tokenizer, unroll=False)


@pytest.mark.parametrize("mesh", ["ep8", "dp2_ep4"])
def test_ragged_engine_matches_single_and_all_to_all(mesh):
    """Logits against `single` and the all-to-all path; on ep8 also greedy tokens and expert statistics
    against `single` (test_experts holds the all-to-all path to the same tokens and statistics)."""
    a, r = _ragged_engine(mesh)
    assert X.dispatch(a.layout) == "all-to-all" and X.dispatch(r.layout) == "ragged"
    ref = engine("single", model=MOE, unroll=False)
    tokens = np.random.RandomState(3).randint(0, 512, (5, 13))
    got = r.logits(tokens)
    assert np.abs(got - ref.logits(tokens)).max() <= 1e-4
    assert np.abs(got - a.logits(tokens)).max() <= 1e-5
    if mesh != "ep8":
        return
    prompts = [list(np.random.RandomState(i).randint(0, 512, n)) for i, n in enumerate((5, 7, 3))]
    kw = dict(max_new_tokens=3, stop_at_eos=False)
    assert r.generate_tokens(prompts, **kw) == ref.generate_tokens(prompts, **kw)
    ex = r.last_stats["experts"]
    assert ex["dropped_total"] == 0 and ex["tokens_per_expert"] == ref.last_stats["experts"]["tokens_per_expert"]


def test_dispatch_is_chosen_by_expert_axis_capacity_and_platform():
    from jax.sharding import AbstractMesh
    from jaxpar.layout.rules import Layout, make_rules
    lay = Layout(AbstractMesh((8,), ("expert",), axis_types=(AxisType.Auto,)), make_rules())
    assert lay.platform == "cpu" and lay.capacity_factor == 0
    assert X.dispatch(lay) == "all-to-all"  # XLA:CPU has no ragged_all_to_all
    for platform in ("tpu", "cuda"):
        assert X.dispatch(dataclasses.replace(lay, platform=platform)) == "ragged"
        assert X.dispatch(dataclasses.replace(lay, platform=platform, capacity_factor=1.25)) == "all-to-all"
    single = Layout(AbstractMesh((8,), ("data",), axis_types=(AxisType.Auto,)), make_rules(), platform="tpu")
    assert X.dispatch(single) == X.dispatch(None) == "dense"
    assert X.dispatch(dataclasses.replace(lay, expert_dispatch="ragged")) == "ragged"
    with pytest.raises(ValueError, match="ragged needs capacity_factor 0"):
        X.dispatch(dataclasses.replace(lay, capacity_factor=1.25, expert_dispatch="ragged"))


def _decode_text(platform, mesh_cfg, cfg):
    """The decode program's StableHLO for `platform`, built as engine/lowering.lower_for builds it, and the
    report's `experts` field."""
    from jaxpar.engine import params as PR
    from jaxpar.engine.steps import step_shapes
    from jaxpar.layout.plan import abstract_layout
    from jaxpar.model.groups import Form
    from jaxpar.serving.scheduler import ServingConfig
    ml = abstract_layout(mesh_cfg, cfg, platform)
    form = Form(stages=ml.layout.size("layers"))
    st = step_shapes(cfg, ml.layout, ml.kv_repeat, form, ServingConfig(), cfg.eos_ids, 1, 16, 16)
    params = PR.abstract_params(cfg, ml.layout, ml.kv_repeat, form=form)
    text = st.programs.generate.lower(*st.decode(params), platform=platform).as_text()
    return text, X.report(cfg, ml.layout)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_dropless_ep8_decode_lowers_to_ragged_all_to_all_and_ragged_dot(platform):
    """tiny-moe on ep8 (dropless; every shipped expert mesh is, test_platforms checks their reports): the
    decode module's scanned MoE layer holds the ragged exchange there and back (a custom call) and three
    chlo.ragged_dot (gate, up, down), and no stablehlo.all_to_all of [E, cap, D] buffers. With a capacity
    factor the same mesh lowers to the buffers' two all_to_alls and nothing ragged."""
    cfg = model_config(load_mesh_file(mesh_path("ep8")), MOE)[0].replace(dtype="bfloat16")
    text, experts = _decode_text(platform, load_mesh_file(mesh_path("ep8")), cfg)
    assert experts == "ragged-all-to-all"
    assert text.count('"chlo.ragged_dot"') == 3 and custom_calls(text) == {"ragged_all_to_all": 2}
    assert "stablehlo.all_to_all" not in text
    capped = parse_mesh({"axes": {"expert": 8}, "capacity_factor": 1.25}, "ep8_cf")
    text, experts = _decode_text(platform, capped, cfg)
    assert experts == "all-to-all"
    assert "ragged" not in text and text.count("stablehlo.all_to_all") == 2


def test_planner_ragged_bytes_are_k_over_e_of_the_capacity_buffers():
    """ep8 tiny-moe, dropless, decode of 64 rows (8 tokens a device): the static path's all-to-alls carry
    [E=8, cap=8, D] buffers; the ragged path's carry the t*k = 16 routed rows, k/E = 1/4 of them, plus an
    all-gather of the 8 x 8 int32 expert counts per layer. On CPU the planner models the static path (what
    compiles there), on cuda/tpu the ragged one."""
    mesh_cfg = load_mesh_file(mesh_path("ep8"))
    cfg = model_config(mesh_cfg, MOE)[0]
    step = C.Step(64, 1, 32, True)

    def expert_comms(platform):
        return [c for c in C.step_collectives(cfg, mesh_cfg, 1, step, 2, platform) if "expert" in c.what]

    static, ragged = expert_comms("cpu"), expert_comms("tpu")
    assert expert_comms("cuda") == ragged
    a2a = {p: next(c for c in cs if c.op == "all-to-all") for p, cs in (("static", static), ("ragged", ragged))}
    layers, e, k, d = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size
    assert a2a["static"].count == a2a["ragged"].count == 2 * layers
    assert a2a["static"].bytes == e * 8 * d * 2
    assert a2a["ragged"].bytes == 8 * k * d * 2 == a2a["static"].bytes * k // e
    counts = [c for c in ragged if c.op == "all-gather"]
    assert [(c.count, c.bytes) for c in counts] == [(layers, 8 * e * 4)]
    assert not [c for c in static if c.op == "all-gather"]


def test_plan_models_the_hardware_platform_s_dispatch(capsys):
    """`jaxpar.plan` models the programs of the hardware it plans for: a GPU or TPU preset's dropless ep8
    layout sends the routed rows (ragged), k/E of the capacity buffers `--platform cpu` models; a hardware file
    names its platform or is refused by name."""
    from jaxpar import plan as plan_cli
    from jaxpar.analysis.hardware import load_hardware
    from jaxpar.errors import HardwareError

    def a2a(*extra):
        plan_cli.main(["--model", "tiny-add-moe", "--devices", "8", "--mesh", mesh_path("ep8"), "--batch", "64",
                       "--json", *extra])
        import json
        return json.loads(capsys.readouterr().out)["layouts"][0]["decode"]["collectives"]["all-to-all"]["bytes"]

    assert load_hardware("tpu-v5e").platform == "tpu" and load_hardware("h100-nvlink").platform == "cuda"
    cpu = a2a("--platform", "cpu")
    assert a2a("--hardware", "tpu-v5e") == a2a("--hardware", "h100-nvlink") == cpu * 2 // 8
    from jaxpar.analysis.hardware import parse_hardware
    entry = {"memory_gb": 16, "hbm_gb_per_s": 800, "tflops": {"bf16": 100},
             "links": [{"name": "x", "group": 8, "gb_per_s": 50, "latency_us": 1}]}
    assert parse_hardware(dict(entry, platform="cpu"), "my.yaml").platform == "cpu"
    with pytest.raises(HardwareError, match=r"my.yaml: platform must be one of cpu, cuda, tpu, got 'gpu'"):
        parse_hardware(dict(entry, platform="gpu"), "my.yaml")
