"""jaxpar's own checkpoints: DIR/config.yaml (the model config) + DIR/params/<parameter path>/ (one Orbax item
per parameter, canonical kv heads).

One item per parameter keeps saving streamed: Orbax copies an item's shards to host memory to write them,
so only one parameter is ever on the host. Restore goes straight into the target mesh's shardings: every
device reads only its own shards."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
import yaml

from jaxpar.config import ModelConfig, config_from_dict
from jaxpar.errors import CheckpointError, ConfigError
from jaxpar.layout.rules import Layout
from jaxpar.engine import params as P
from jaxpar.engine.quantize import LeafQuantizer, check_blocks
from jaxpar.model.groups import CANONICAL, Form


def save(directory: str, cfg: ModelConfig, params: dict, kv_repeat: int = 1, layout: Layout | None = None) -> None:
    """With kv_repeat > 1 the duplicate kv heads are dropped on device first (needs the params' layout)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if jax.process_index() == 0:  # several processes write one checkpoint: Orbax coordinates the shards
        with open(os.path.join(directory, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    ckpt = ocp.StandardCheckpointer()
    for name, leaf in P.flatten(P.canonical_kv(params, cfg, layout, kv_repeat)).items():
        ckpt.save(os.path.join(directory, "params", name), {"value": leaf}, force=True)
        ckpt.wait_until_finished()  # one parameter's shards on the host at a time


def read_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.yaml")
    if os.path.isfile(directory):
        raise CheckpointError(f"{directory}: is a file, not a checkpoint directory (a jaxpar checkpoint is a "
                              f"directory holding config.yaml and params/)")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(directory, "params")):
        raise CheckpointError(f"{directory}: not a jaxpar checkpoint (expected config.yaml and params/)")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return config_from_dict(data, path)


def restore(directory: str, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, form: Form = CANONICAL) -> dict:
    """The checkpoint's parameters on `layout`, in `form` (model/groups.Form): padded for pipeline stages as they
    are read (Orbax appends the zeros), or in the split form, each parameter split into its layers as it is
    read, so the canonical and split forms are never whole at once (with kv_repeat > 1 the tree is expanded,
    then regrouped, whole)."""
    path = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: checkpoint not found (no params/ directory)")
    have_names = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
    if not have_names:
        raise CheckpointError(f"{directory}: checkpoint holds no parameters (empty or unfinished params/)")
    stacked = CANONICAL if form.split else form
    check_blocks(cfg, layout, kv_repeat, stacked, directory)
    # a float checkpoint loaded quantized: each parameter is quantized as it is read (engine/quantize.py)
    own = read_config(directory)
    source = cfg.replace(quantize=own.quantize, quant_block=own.quant_block)
    quantizer = LeafQuantizer(cfg, layout, 1, stacked, replicate_kv=kv_repeat > 1) if (
        source.quantize != cfg.quantize) else None
    target = P.flatten(P.abstract_params(source, layout, 1, replicate_kv=kv_repeat > 1, form=stacked))
    stored = P.flatten(P.shapes(source, 1))
    missing = sorted(set(target) - set(have_names))
    extra = sorted(set(have_names) - set(target))
    if missing or extra:
        raise CheckpointError(f"{directory}: checkpoint parameters do not match the model config: "
                              f"missing {missing[:4]}, unexpected {extra[:4]}")
    ckpt = ocp.StandardCheckpointer()
    for name in sorted(target):  # every shape checked before anything is read
        try:
            meta = ckpt.metadata(os.path.join(path, name))
            have = tuple(getattr(meta, "item_metadata", meta)["value"].shape)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; the user needs one line
            raise CheckpointError(f"{directory}: cannot read the metadata of parameter {name}: "
                                  f"{str(e).splitlines()[0][:200]}") from None
        if have != tuple(stored[name].shape):
            raise CheckpointError(f"{directory}: parameter {name} has shape {have} in the checkpoint but the "
                                  f"model config needs {tuple(stored[name].shape)}")
    padding = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    flat = {}
    for name, t in target.items():
        try:
            if t.shape == stored[name].shape:
                leaf = ckpt.restore(os.path.join(path, name), {"value": t})["value"]
            else:  # a group padded for pipeline stages: zeros appended to its layers axis
                leaf = padding.restore(os.path.join(path, name),
                                       args=ocp.args.StandardRestore({"value": t}, strict=False))["value"]
        except Exception as e:  # noqa: BLE001 - corrupt or truncated files surface as many exception types
            raise CheckpointError(f"{directory}: cannot read parameter {name}: "
                                  f"{str(e).splitlines()[0][:300]}") from None
        pieces = quantizer(name, leaf) if quantizer else {name: leaf}
        del leaf
        for piece, leaf in pieces.items():
            flat.update(P.split_leaf(piece, leaf, cfg, layout) if form.split and kv_repeat == 1 else {piece: leaf})
    params = P.expand_kv(P.unflatten(flat), cfg, layout, kv_repeat, stacked)
    return P.regroup(params, cfg, layout, kv_repeat, form) if form.split and kv_repeat > 1 else params
