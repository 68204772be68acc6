"""The Colab notebooks run top to bottom on CPU (8 simulated devices, the fallback they take off a TPU
runtime), and are stored without outputs."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import CHILD_XLA_FLAGS, ROOT

NOTEBOOKS = ["quickstart.ipynb", "parallelism_tour.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_on_cpu(name, tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = CHILD_XLA_FLAGS  # the notebook asks for 8 devices itself
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MPLBACKEND", None)  # the kernel's inline backend renders the plots into the notebook
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.get("output_type") == "stream")
    assert "8 x cpu (cpu)" in text  # the fallback: 8 simulated devices
    if name == "quickstart.ipynb":
        assert "['579', '46', '1000']" in text and "tp4" in text
        assert "max |logits - single|" in text
    else:
        assert "sp4_ulysses" in text and "'kind': 'seq (ring)', 'n': 8" in text
        assert "recommended:" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= (1 if name == "quickstart.ipynb" else 2)
