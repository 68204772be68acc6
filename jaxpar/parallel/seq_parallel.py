"""The row-parallel projections (attention output, FFN down) landing on the residual stream's layout.

By default the residual stream is split like the sequence (`residual_seq` -> the `seq` axes) and XLA sums
the partial products of a tensor-split contraction with one all-reduce. With `rules: {residual_seq: [seq,
tensor]}` (NVIDIA-style sequence parallelism) the residual stream is also split over `tensor` along the
sequence: the partial products are summed with a reduce-scatter instead (each device keeps its slice of
the sum: half the bytes of an all-reduce), norms run on 1/tensor of the tokens, and XLA all-gathers the
sequence again before the next column-parallel matmul."""
from __future__ import annotations

import jax

from jaxpar.layout.rules import active, constrain
from jaxpar.model import quant

RESIDUAL = ("batch", "residual_seq", "embed")


def scatter_axes(lay) -> tuple:
    """The mesh axes the residual stream splits beyond the sequence's (empty: plain all-reduce)."""
    seq = lay.axes("seq")
    return tuple(a for a in lay.axes("residual_seq") if a not in seq)


def row_parallel(eq: str, x, w, x_names: tuple, w_names: tuple):
    """jnp.einsum(eq, x, w) -> [B, S, embed] on the residual layout. The contracted dims are the ones split
    over tensor (heads, mlp): with NVIDIA-style sequence parallelism the sum is a reduce-scatter."""
    lay = active()
    if lay is None or lay.mesh.size == 1 or not scatter_axes(lay):
        return constrain(quant.einsum(eq, x, w), RESIDUAL)
    axes = scatter_axes(lay)

    def local(x, w):
        return jax.lax.psum_scatter(quant.einsum(eq, x, w), axes, scatter_dimension=1, tiled=True)
    return lay.shard_map(local, in_specs=(lay.spec(x_names), quant.spec(lay, w, w_names)),
                         out_specs=lay.spec(RESIDUAL))(x, w)
