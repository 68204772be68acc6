"""Orbax checkpoints: saved on one mesh, restored straight into another's shardings."""
import os

import numpy as np
import pytest
import yaml

import jaxpar
from conftest import mesh_path
from jaxpar.config import ModelConfig

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8, head_dim=8,
                  num_key_value_heads=2, max_position_embeddings=32, eos_token_id=95)
TOKENS = np.random.RandomState(0).randint(0, 96, (2, 9))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    src = jaxpar.load(mesh=mesh_path("tp4"), model=CFG, seed=3)  # kv heads replicated 2x on tp4
    d = str(tmp_path_factory.mktemp("ckpt") / "model")
    src.save(d)
    return d, src.logits(TOKENS)


@pytest.mark.parametrize("mesh", ["single", "dp8", "tp2", "tp8", "dp2_tp4"])
def test_restore_onto_any_mesh(saved, mesh):
    d, ref = saved
    import jax
    eng = jaxpar.load(mesh=mesh_path(mesh), checkpoint=d, devices=jax.devices()[:1] if mesh == "single" else None)
    assert eng.config == CFG
    assert np.abs(eng.logits(TOKENS) - ref).max() <= 1e-5
    for leaf in jax.tree.leaves(eng.params):  # restored in the target mesh's shardings
        assert leaf.sharding.mesh.shape == eng.mesh.shape


def test_checkpoint_stores_canonical_kv_heads(saved):
    import orbax.checkpoint as ocp
    d, _ = saved
    meta = ocp.StandardCheckpointer().metadata(os.path.join(d, "params", "group0.block0.attn.wk"))
    tree = getattr(meta, "item_metadata", meta)
    assert tuple(tree["value"].shape) == (2, 32, 2, 8)


def test_shape_mismatch_is_refused(saved, tmp_path):
    import shutil
    d, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = yaml.safe_load(open(bad / "config.yaml"))
    cfg["intermediate_size"] = 128
    yaml.safe_dump(cfg, open(bad / "config.yaml", "w"))
    with pytest.raises(jaxpar.JaxparError, match=r"group0\.block0\.mlp\.w_down.*\(2, 64, 32\).*\(2, 128, 32\)"):
        jaxpar.load(mesh=mesh_path("tp2"), checkpoint=str(bad))
