"""Layer groups: the decoder as a sequence of groups, each a unit of layers repeated some number of times.

Every layer has a kind (does its attention slide, is its feed-forward a mixture of experts). Consecutive layers
that repeat one unit of kinds form a group: its parameters are stacked per unit position on a leading `layers`
axis of length `repeats`, and the group is scanned over its repeats (or pipelined over `stage`). Today's
homogeneous models are one group with a one-layer unit; DeepSeek-style models (dense first layers) are a dense
group then an MoE group; alternating sliding/full attention (gpt-oss, Gemma 2) is one group whose unit is the
pattern, and Gemma 3 27B's 62 layers are its 6-layer pattern x 10 then a group of the 2 sliding layers left.

The same mechanism gives the split form CPU runs use: every layer its own group of one repeat, applied one
after another, so each layer's weights are read where they lie (XLA:CPU copies the slice of stacked weights a
scan step takes). Under pipeline stages each group's repeats are split over the stages; a group whose repeats
do not divide by the stages is padded with repeats that the pipeline skips (`Form`). `regroup`
(engine/params.py) moves parameters between the forms."""
from __future__ import annotations

import dataclasses
import functools

from jaxpar.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerKind:
    sliding: bool  # attends within cfg.sliding_window (else to every earlier position)
    moe: bool  # a mixture-of-experts feed-forward (else dense)

    def describe(self) -> str:
        return f"{'sliding' if self.sliding else 'full'}/{'moe' if self.moe else 'dense'}"


@dataclasses.dataclass(frozen=True)
class Form:
    """How parameters and KV pools hold the layers. The canonical form (what checkpoints store): the model's
    groups. split: every layer its own group (CPU runs). stages > 1: the model's groups, each padded to a
    multiple of the pipeline stages, so that every stage holds the same number of each group's repeats (the
    padding repeats hold zeros and the pipeline skips them: DeepSeek-V3's 3 dense layers on 2 stages are 4
    slots, one of them padding)."""
    split: bool = False
    stages: int = 1


CANONICAL = Form()
SPLIT = Form(split=True)


@dataclasses.dataclass(frozen=True)
class Group:
    unit: tuple  # LayerKind per position of the repeating unit
    repeats: int
    first: int  # index of the group's first layer
    padding: int = 0  # repeats added after the real ones so the stages divide them (Form.stages)

    @property
    def layers(self) -> int:
        return len(self.unit) * self.repeats

    @property
    def slots(self) -> int:
        """Repeats the stacked parameters and pools hold: the real ones, then the padding."""
        return self.repeats + self.padding

    def layer_index(self, repeat: int, position: int) -> int:
        return self.first + repeat * len(self.unit) + position

    def describe(self) -> str:
        unit = " + ".join(k.describe() for k in self.unit)
        pad = f" (+ {self.padding} padding for the pipeline stages)" if self.padding else ""
        return f"layers {self.first}-{self.first + self.layers - 1}: ({unit}) x {self.repeats}{pad}"


def layer_kinds(cfg: ModelConfig) -> tuple:
    """Each layer's kind, from `layer_types` (which layers slide; without it every layer slides when
    sliding_window is set) and `mlp_only_layers` (the dense layers of a mixture-of-experts model)."""
    n = cfg.num_hidden_layers
    if cfg.layer_types is not None:
        sliding = [t == "sliding_attention" for t in cfg.layer_types]
    else:
        sliding = [cfg.sliding_window is not None] * n
    dense = set(cfg.mlp_only_layers or ())
    return tuple(LayerKind(sliding[i], bool(cfg.num_local_experts) and i not in dense) for i in range(n))


def _repeats(kinds: tuple, start: int, p: int) -> int:
    """How many times the unit kinds[start:start+p] repeats from `start` on."""
    unit, r = kinds[start:start + p], 1
    while kinds[start + r * p:start + (r + 1) * p] == unit:
        r += 1
    return r


@functools.lru_cache(maxsize=64)
def layer_groups(cfg: ModelConfig, form: Form = CANONICAL) -> tuple:
    """The decoder's groups in `form`: the grouping with the fewest distinct blocks (the sum of the unit
    lengths, which is what the compiled program's size follows), then the fewest groups, then the longest first
    group (a pattern is read from the first layer on); split: every layer its own group; stages: each group
    padded to a multiple of them."""
    kinds = layer_kinds(cfg)
    if form.split:
        return tuple(Group((k,), 1, i) for i, k in enumerate(kinds))
    return tuple(dataclasses.replace(g, padding=-g.repeats % form.stages) for g in _grouping(kinds))


@functools.lru_cache(maxsize=64)
def _grouping(kinds: tuple) -> tuple:
    n = len(kinds)
    best: list = [None] * n + [((0, 0, 0), ())]  # from layer i on: ((blocks, groups, -first group's layers), groups)
    for i in range(n - 1, -1, -1):
        for p in range(1, n - i + 1):
            for r in range(1, _repeats(kinds, i, p) + 1):
                (blocks, count, _), rest = best[i + p * r]
                cand = ((blocks + p, count + 1, -p * r), (Group(kinds[i:i + p], r, i),) + rest)
                if best[i] is None or cand[0] < best[i][0]:
                    best[i] = cand
    return best[0][1]


def moe_layers(cfg: ModelConfig) -> tuple:
    """Indices of the mixture-of-experts layers, in order (the rows of the expert statistics)."""
    return tuple(i for i, k in enumerate(layer_kinds(cfg)) if k.moe)


def shared_window(cfg: ModelConfig) -> int | None:
    """The window when every layer slides (then a request's pages behind it can be given back: serving keeps one
    page table for all layers), else None."""
    kinds = layer_kinds(cfg)
    return cfg.sliding_window if kinds and all(k.sliding for k in kinds) else None


def ring_window(cfg: ModelConfig) -> int | None:
    """The window of the sliding layers when the model also has full ones (their caches are per-slot rings:
    engine/state.ring_table), else None."""
    kinds = layer_kinds(cfg)
    return cfg.sliding_window if any(k.sliding for k in kinds) and not all(k.sliding for k in kinds) else None


def context_layers(cfg: ModelConfig, stages: int = 1) -> int:
    """Layers whose KV cache grows with the context (all but the sliding layers of a mixed model), held by one
    of `stages` pipeline stages (padding included: each stage holds its share of every group's slots)."""
    ring = ring_window(cfg) is not None
    return sum(g.slots // stages * sum(not (ring and k.sliding) for k in g.unit)
               for g in layer_groups(cfg, Form(stages=stages)))


def ring_layers(cfg: ModelConfig, stages: int = 1) -> int:
    """The sliding layers of a model mixing sliding and full ones (their caches are window rings) held by one
    of `stages` pipeline stages."""
    if ring_window(cfg) is None:
        return 0
    return sum(g.slots // stages * sum(k.sliding for k in g.unit) for g in layer_groups(cfg, Form(stages=stages)))
