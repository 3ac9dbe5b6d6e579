"""Composition of experts: route each prompt to one of several whole models (any family) and let only it answer.

``features``: what the router sees (mean-pooled hidden states of an embedding model; hashed character n-grams);
``router``: kNN and logistic heads over those features; ``oracle``: the per-expert completion loss and the
oracle's labels; ``composition``: a CoE directory loaded (``CompositionOfExperts``); ``build``: writing one;
``evaluation``: routing against the oracle; ``demo``: a small end-to-end run.
"""

from hybridlm.coe.composition import CoEError, CompositionOfExperts, Expert, Generation, Routing

__all__ = ["CoEError", "CompositionOfExperts", "Expert", "Generation", "Routing"]
