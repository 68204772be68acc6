"""jaxpar: a layout is a file. Sharded inference for Llama-family models on any device mesh.

Importing jaxpar does not import JAX, so `python -m jaxpar.<tool> --fake-devices N` can still choose the
device count before JAX starts."""

__all__ = ["load", "JaxparError", "ModelConfig", "MeshConfig"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "load":
        from jaxpar.api import load
        return load
    if name == "JaxparError":
        from jaxpar.errors import JaxparError
        return JaxparError
    if name == "ModelConfig":
        from jaxpar.config import ModelConfig
        return ModelConfig
    if name == "MeshConfig":
        from jaxpar.layout.mesh_file import MeshConfig
        return MeshConfig
    raise AttributeError(f"module 'jaxpar' has no attribute {name!r}")
