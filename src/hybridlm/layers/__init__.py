"""Layers: mixers (one file each, registered by their pattern letter), feed-forwards and norms.

A mixer keeps the contract in ``layers.mixer`` (``forward``, ``step``, ``init_state``, ``check_config``,
``prefill_work``, a ``kind`` and a ``label``; optionally ``bind_step`` for a compiled decode step). Registering it is
one line in ``MIXERS``.
"""

from torch import nn

from hybridlm import config
from hybridlm.layers.attention import Attention
from hybridlm.layers.linear_attention import LinearAttention
from hybridlm.layers.lsh_attention import LSHAttention
from hybridlm.layers.mamba import Mamba
from hybridlm.layers.mamba2 import Mamba2
from hybridlm.layers.mlp import GatedMLP
from hybridlm.layers.moe import MoE
from hybridlm.layers.norm import GatedRMSNorm, RMSNorm

MIXERS: dict[str, type[nn.Module]] = {
    "A": Attention,
    "M": Mamba,
    "S": Mamba2,
    "L": LinearAttention,
    "R": LSHAttention,  # Reformer
}

FEED_FORWARDS = {
    "mlp": GatedMLP,
    "moe": MoE,
}


def register_mixer(letter: str, mixer: type[nn.Module]) -> None:
    """Make ``mixer`` the mixer of pattern letter ``letter`` (the built-in ones are the entries of ``MIXERS``; this is
    for a mixer defined outside the package, e.g. in an experiment or a test)."""
    config.register_mixer(letter, mixer.kind, mixer.label, mixer.check_config)
    MIXERS[letter] = mixer


def unregister_mixer(letter: str) -> None:
    """Forget the mixer of ``letter`` (the inverse of ``register_mixer``)."""
    del MIXERS[letter]
    del config.MIXER_LETTERS[letter]


for _letter, _mixer in list(MIXERS.items()):  # ModelConfig validates its pattern against these letters
    register_mixer(_letter, _mixer)

__all__ = ["FEED_FORWARDS", "MIXERS", "Attention", "GatedMLP", "GatedRMSNorm", "LSHAttention", "LinearAttention",
           "Mamba", "Mamba2", "MoE", "RMSNorm", "register_mixer", "unregister_mixer"]
