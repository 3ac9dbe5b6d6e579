"""Layers: mixers (one file each, registered by their pattern letter), feed-forwards and norms.

A new mixer is one new module with ``forward(x, state=None, mask=None)``, ``step(x, state, norm=None)`` (one
decode step; with the block's pre-norm ``norm`` it returns the block's residual update ``x + forward(norm(x))``),
``init_state(...)`` and a ``kind`` name, plus one line in ``MIXERS``.
"""

from hybridlm.layers.attention import Attention
from hybridlm.layers.mamba import Mamba
from hybridlm.layers.mamba2 import Mamba2
from hybridlm.layers.mlp import GatedMLP
from hybridlm.layers.moe import MoE
from hybridlm.layers.norm import GatedRMSNorm, RMSNorm

MIXERS = {
    "A": Attention,
    "M": Mamba,
    "S": Mamba2,
}

FEED_FORWARDS = {
    "mlp": GatedMLP,
    "moe": MoE,
}

__all__ = ["FEED_FORWARDS", "MIXERS", "Attention", "GatedMLP", "GatedRMSNorm", "Mamba", "Mamba2", "MoE", "RMSNorm"]
