"""`jaxpar.load`: the Python entry point."""
from __future__ import annotations

import os

from jaxpar.config import QUANT_FORMATS, ModelConfig, load_config, shipped_model_dir
from jaxpar.errors import CheckpointError, JaxparError
from jaxpar.layout.mesh_file import MeshConfig, load_mesh_file
from jaxpar.layout.plan import plan_layout
from jaxpar.tokenizer import ByteTokenizer

DEFAULT_MODEL = "tiny-add"
DEFAULT_MOE_MODEL = "tiny-add-moe"  # the default on meshes with an expert axis
DTYPES = ("float32", "bfloat16", "auto")
# how a model is stored and computed on this deployment, not what it is: a checkpoint's config may differ in these
DEPLOYMENT = ("dtype", "quantize", "quant_block", "kv_dtype")
FAKE_HINT = "; on a CPU, --fake-devices N (or jaxpar.load(..., fake_devices=N)) simulates N devices"


def load(mesh="single", model=None, checkpoint=None, hf=None, dtype=None, seed: int = 0, devices=None,
         unroll=None, fake_devices: int | None = None, quantize=None, kv_dtype=None, **serving):
    """Build an Engine: a model laid out on a mesh.

    mesh: a mesh file path, a shipped mesh name (`tp4`, found from any directory), or a MeshConfig.
    fake_devices: run on N simulated CPU devices, as the CLI's --fake-devices N. It must come before JAX
    starts its backend (the first jax.devices() or computation in this process); afterwards only the count
    JAX already has is accepted.
    model: None (the embedded default: tiny-add, or tiny-add-moe on a mesh with an expert axis; or the config
    stored with `checkpoint`), a config path, a shipped model name, or a ModelConfig. A model with no checkpoint gets random weights from `seed`.
    dtype: of parameters, activations and KV cache: "float32", "bfloat16", or "auto" (the checkpoint's own, as
    its config says; a random model's config dtype). None: float32 on CPU devices (XLA:CPU runs bfloat16 matrix
    products several times slower, and a bfloat16 checkpoint then takes twice its size in memory), "auto" on
    GPU/TPU.
    quantize: None (weights as the checkpoint stores them), "int8" or "fp8" (e4m3): weights stored in 8 bits
    with float32 scales per output channel (model/quant.py), quantized as they are loaded. A quantized
    checkpoint loads as it is.
    kv_dtype: None (the KV cache in dtype), "int8" or "fp8": the cache in 8 bits with a scale per token and head.
    unroll: layers applied one after another with per-layer weights and cache (True), or scanned over the
    stacked layers (False); None: unrolled on CPU without a pipeline, scanned otherwise.
    serving: options of continuous batching and the paged KV cache (jaxpar.serving.scheduler.ServingConfig):
    max_num_seqs, max_model_len, page_size, num_pages, max_num_batched_tokens, prefill_chunk, decode_steps,
    max_queue.
    """
    from jaxpar.engine import checkpoint as ckpt
    from jaxpar.engine import params as P
    from jaxpar.engine.engine import Engine, run_form

    if dtype is not None and dtype not in DTYPES:
        raise JaxparError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("quantize", quantize), ("kv-dtype", kv_dtype)):
        if value is not None and value not in QUANT_FORMATS:
            raise JaxparError(f"--{name} must be one of {', '.join(QUANT_FORMATS)}, got {value!r}")
    storage = dict(quantize=quantize, kv_dtype=kv_dtype)
    serving_cfg = serving_config(serving)
    if fake_devices is not None:
        use_fake_devices(fake_devices)
    import jax

    mesh_cfg = mesh if isinstance(mesh, MeshConfig) else load_mesh_file(str(mesh))
    devices = list(jax.devices() if devices is None else devices)
    # the mesh alone is checked before any model file is read
    mesh_cfg = mesh_cfg.resolved(len(devices), FAKE_HINT)
    if dtype is None:
        dtype = "float32" if devices[0].platform == "cpu" else "auto"
    if hf is not None:
        if checkpoint is not None:
            raise JaxparError("give either --hf or --checkpoint, not both")
        return _load_hf(hf, mesh_cfg, model, dtype, devices, unroll, serving_cfg, storage)
    cfg, checkpoint = model_config(mesh_cfg, model, checkpoint)
    cfg = with_storage(cfg, dtype, **storage, source=checkpoint)
    ml = plan_layout(mesh_cfg, cfg, devices)
    if checkpoint is not None:
        params = ckpt.restore(checkpoint, cfg, ml.layout, ml.kv_repeat, run_form(ml.layout, unroll))
    else:
        params = P.init_params(cfg, ml.layout, ml.kv_repeat, seed)
    tokenizer = ByteTokenizer()
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        from jaxpar.hf.tokenizer import load_tokenizer  # a checkpoint converted from Hugging Face
        tokenizer = load_tokenizer(checkpoint, cfg)
    return Engine(cfg, ml, params, tokenizer, unroll, serving_cfg)


def model_config(mesh_cfg: MeshConfig, model=None, checkpoint: str | None = None) -> tuple:
    """(the model config, the checkpoint directory or None) that `load` resolves from its `model` and
    `checkpoint` arguments (see load); `hf` is read by hf/config.py instead."""
    from jaxpar.engine import checkpoint as ckpt

    if checkpoint is None and model is None:
        default = DEFAULT_MOE_MODEL if mesh_cfg.size("expert") > 1 else DEFAULT_MODEL
        checkpoint = os.path.join(shipped_model_dir(default), "checkpoint")
    elif checkpoint is None and isinstance(model, str) and not os.path.exists(model):
        d = shipped_model_dir(model)
        if d and os.path.isdir(os.path.join(d, "checkpoint")):
            checkpoint = os.path.join(d, "checkpoint")
    if checkpoint is None:
        return (model if isinstance(model, ModelConfig) else load_config(model)), None
    cfg = ckpt.read_config(checkpoint)
    if model is not None:
        other = model if isinstance(model, ModelConfig) else load_config(model)
        if other.replace(**{k: getattr(cfg, k) for k in DEPLOYMENT}) != cfg:
            raise CheckpointError(f"{checkpoint}: the checkpoint's config.yaml differs from the model config "
                                  f"given ({_diff(cfg, other)})")
    return cfg, checkpoint


def with_storage(cfg: ModelConfig, dtype: str, quantize: str | None = None, kv_dtype: str | None = None,
               source: str | None = None) -> ModelConfig:
    """The config computing in `dtype` ("auto" keeps the dtype the checkpoint's config names), its weights
    quantized as `quantize` says (None: as the checkpoint stores them) and its KV cache in `kv_dtype`."""
    if dtype != "auto":
        cfg = cfg.replace(dtype=dtype)
    if quantize is not None:
        if cfg.quantize not in (None, quantize):
            raise CheckpointError(f"{source}: the checkpoint's weights are {cfg.quantize}; they load as they are "
                                  f"(no --quantize, or --quantize {cfg.quantize}), not requantized to {quantize}")
        cfg = cfg.replace(quantize=quantize)
    return cfg if kv_dtype is None else cfg.replace(kv_dtype=kv_dtype)


def use_fake_devices(n) -> None:
    """N simulated CPU devices for this process (the CLI's --fake-devices), or a JaxparError saying why not."""
    from jaxpar.tools import cli
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise JaxparError(f"fake_devices must be an integer >= 1, got {n!r}")
    if cli.backend_started():  # the device count is fixed once JAX has created its devices
        import jax
        have = jax.devices()
        if len(have) != n:
            raise JaxparError(f"fake_devices={n}: JAX has already started with {len(have)} {have[0].platform} "
                              f"device(s), and the device count cannot change after that; call "
                              f"jaxpar.load(..., fake_devices={n}) before anything else uses JAX in this process "
                              f"(in a notebook: restart the kernel)")
        return
    cli.setup_devices(n)


def _diff(a: ModelConfig, b: ModelConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    keys = [k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k) and k not in DEPLOYMENT]
    return ", ".join(f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in keys[:4])


def serving_config(options: dict):
    """ServingConfig from load()'s keyword options; an unknown name is refused with the list of known ones."""
    import dataclasses

    from jaxpar.serving.scheduler import ServingConfig
    known = [f.name for f in dataclasses.fields(ServingConfig)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise JaxparError(f"load() got unknown option(s) {', '.join(unknown)}; serving options are {', '.join(known)}")
    return ServingConfig(**options)


def _load_hf(directory, mesh_cfg, model, dtype, devices, unroll=None, serving_cfg=None, storage=None):
    from jaxpar.engine.engine import Engine, run_form
    from jaxpar.hf.config import read_hf_config
    from jaxpar.hf.tokenizer import load_tokenizer
    from jaxpar.hf import weights

    if model is not None:
        raise JaxparError("give either --hf or --model, not both (the model config comes from config.json)")
    cfg = with_storage(read_hf_config(str(directory)), dtype, **(storage or {}), source=str(directory))
    ml = plan_layout(mesh_cfg, cfg, devices)
    tokenizer = load_tokenizer(str(directory), cfg)
    params = weights.load(str(directory), cfg, ml.layout, ml.kv_repeat, run_form(ml.layout, unroll))
    return Engine(cfg, ml, params, tokenizer, unroll, serving_cfg)
