"""The shipped example configs run with the single-device answer on one mesh of every kind and combination
of parallelism (tests/test_meshes.py runs every shipped mesh with the embedded model; tp2/tp4, sp4 and pp2
are smaller cases of the same code as tp8, sp8 and pp4)."""
import os

import jax
import numpy as np
import pytest

import jaxpar
from conftest import MESHES, ROOT, mesh_path
from jaxpar.config import load_config

CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.startswith("tiny-") and f.endswith(".yaml"))
TOKENS = np.random.RandomState(1).randint(0, 256, (3, 12))
# one mesh of each kind the example configs add something to (their heads, experts and context against
# tensor, sequence and pipeline splits); data-only and the other shipped meshes run tiny-add in test_meshes
KINDS = ["tp8", "sp4_ulysses", "dp2_sp2_tp2", "pp2_tp4"]
# the model-family configs' attention and layer groups run on every mesh kind in tests/test_hf.py (their
# Hugging Face twins); here they run on the two meshes that combine the most axes
FAMILY_KINDS = {"tiny-mla.yaml": ["tp8", "dp2_sp2_tp2"], "tiny-hybrid.yaml": ["tp8", "dp2_sp2_tp2"]}


@pytest.mark.parametrize("name", CONFIGS)
def test_example_configs_give_the_same_logits_on_every_mesh(name):
    path = os.path.join(ROOT, "configs", name)
    load_config(path)  # validates
    ref = jaxpar.load(mesh=mesh_path("single"), model=path, devices=jax.devices()[:1]).logits(TOKENS)
    assert set(KINDS) < set(MESHES)
    for mesh in FAMILY_KINDS.get(name, KINDS):
        got = jaxpar.load(mesh=mesh_path(mesh), model=path).logits(TOKENS)
        assert np.abs(got - ref).max() <= 1e-4, (name, mesh)


def test_moe_without_renormalised_top_k_differs_but_agrees_across_meshes(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny-moe.yaml"))
    plain = cfg.replace(norm_topk_prob=False)
    one = jaxpar.load(mesh=mesh_path("single"), model=plain, devices=jax.devices()[:1]).logits(TOKENS)
    assert np.abs(jaxpar.load(mesh=mesh_path("tp4"), model=plain).logits(TOKENS) - one).max() <= 1e-4
    normed = jaxpar.load(mesh=mesh_path("single"), model=cfg, devices=jax.devices()[:1]).logits(TOKENS)
    assert np.abs(normed - one).max() > 1e-3  # the option changes the computation
