"""Lazy views of checkpoint tensors that a device's shard reads slice by slice: MXFP4 expert weights (gpt-oss
checkpoints), strided columns, and per-head row orders.

MXFP4 expert weights are dequantized lazily: a device's shard reads and expands only its
own slice of the packed blocks, so loading never holds a whole dequantized tensor on the host.

Layout, as transformers reads it (integrations/mxfp4.py): `<name>_blocks` [E, R, G, 16] uint8 holds 32 FP4
(e2m1) values per group, two per byte, low nibble first; `<name>_scales` [E, R, G] uint8 holds each group's
power-of-two scale with a bias of 127. Dequantized, a row r is G * 32 values; the weight is the transpose,
[E, G * 32, R] (gate_up_proj [E, D, 2F], down_proj [E, F, D])."""
from __future__ import annotations

import numpy as np

FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] float32."""
    lo, hi = FP4[blocks & 0x0F], FP4[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(blocks.shape[:-1] + (32,))
    vals = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
    return vals.reshape(blocks.shape[:-2] + (-1,))


def _resolve(idx, shape):
    idx = idx if isinstance(idx, tuple) else (idx,)
    return tuple(idx) + (slice(None),) * (len(shape) - len(idx))


class MXFP4:
    """The dequantized [E, G * 32, R] weight of a blocks/scales pair, read slice by slice."""

    def __init__(self, blocks, scales):
        e, r, g, _ = blocks.shape
        self.blocks, self.scales = blocks, scales
        self.shape = (e, g * 32, r)
        self.ndim = 3

    def __getitem__(self, idx):
        ei, ii, ri = _resolve(idx, self.shape)  # slices (what shard readers pass)
        lo, hi, step = ii.indices(self.shape[1])
        groups = slice(lo // 32, -(-hi // 32))  # the groups the inner slice touches
        vals = dequantize(np.asarray(self.blocks[ei, ri, groups]), np.asarray(self.scales[ei, ri, groups]))
        return np.swapaxes(vals[..., lo - groups.start * 32:hi - groups.start * 32:step], -1, -2)


class HeadRows:
    """A lazy [in, heads, per_head] view of a Linear weight [heads * per_head, in] whose rows inside each head are
    taken in `order` (MLA's de-interleaved rope dims): a shard reads only its own heads' rows."""

    def __init__(self, parent, heads: int, order):
        self.parent, self.heads, self.order = parent, heads, np.asarray(order)
        self.shape = (parent.shape[1], heads, len(self.order))
        self.ndim = 3

    def __getitem__(self, idx):
        ii, hi, ki = _resolve(idx, self.shape)
        heads = np.arange(self.heads)[hi]
        rows = (heads[:, None] * len(self.order) + self.order[ki][None, :]).reshape(-1)
        block = np.asarray(self.parent[rows, ii])  # [heads * k, in]
        return block.reshape(len(heads), -1, block.shape[-1]).transpose(2, 0, 1)


class Strided:
    """A lazy strided view along one axis (gate_up's interleaved gate and up columns): index j of that axis is
    index start + step * j of the parent."""

    def __init__(self, parent, axis: int, start: int, step: int):
        self.parent, self.axis, self.start, self.step = parent, axis, start, step
        n = parent.shape[axis]
        self.shape = parent.shape[:axis] + (len(range(start, n, step)),) + parent.shape[axis + 1:]
        self.ndim = len(self.shape)

    def __getitem__(self, idx):
        idx = list(_resolve(idx, self.shape))
        a, b, c = idx[self.axis].indices(self.shape[self.axis])
        idx[self.axis] = slice(self.start + self.step * a, self.start + self.step * b, self.step * c)
        return np.asarray(self.parent[tuple(idx)])
