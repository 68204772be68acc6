"""jaxpar's own checkpoints: DIR/config.yaml (the model config) + DIR/params (Orbax), canonical kv heads.

Restore goes straight into the target mesh's shardings: every device reads only its own shards."""
from __future__ import annotations

import os

import orbax.checkpoint as ocp
import yaml

from jaxpar.config import ModelConfig, config_from_dict
from jaxpar.errors import CheckpointError, ConfigError
from jaxpar.layout.rules import Layout
from jaxpar.engine import params as P


def save(directory: str, cfg: ModelConfig, params: dict, kv_repeat: int = 1, layout: Layout | None = None) -> None:
    """Orbax writes each device's shards; with kv_repeat > 1 the duplicate kv heads are dropped on device
    first (needs the params' layout). Orbax itself copies the shards to host memory before writing them."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    canon = P.canonical_kv(params, cfg, layout, kv_repeat)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, "params"), canon, force=True)
    ckpt.wait_until_finished()


def read_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.yaml")
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


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def restore(directory: str, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1) -> dict:
    path = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: checkpoint not found (no params/ directory)")
    ckpt = ocp.StandardCheckpointer()
    try:
        meta = ckpt.metadata(path)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; the user needs one line
        raise CheckpointError(f"{directory}: cannot read checkpoint metadata: {str(e).splitlines()[0]}") from None
    meta_tree = getattr(meta, "item_metadata", meta)
    if not meta_tree:
        raise CheckpointError(f"{directory}: checkpoint holds no parameters (empty or unfinished params/)")
    have = {k: tuple(v.shape) for k, v in _flat(dict(meta_tree)).items()}
    target = P.abstract_params(cfg, layout, 1, replicate_kv=kv_repeat > 1)
    want = {k: tuple(v.shape) for k, v in _flat(target).items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(f"{directory}: checkpoint parameters do not match the model config: "
                              f"missing {missing[:4]}, unexpected {extra[:4]}")
    for k in sorted(want):
        if want[k] != have[k]:
            raise CheckpointError(f"{directory}: parameter {k} has shape {have[k]} in the checkpoint but the "
                                  f"model config needs {want[k]}")
    try:
        params = ckpt.restore(path, target)
    except Exception as e:  # noqa: BLE001 - corrupt or truncated files surface as many exception types
        raise CheckpointError(f"{directory}: cannot read checkpoint: {str(e).splitlines()[0][:300]}") from None
    return P.expand_kv(params, cfg, layout, kv_repeat)

