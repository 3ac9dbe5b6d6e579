"""hybridlm: Transformer, Mamba-1/2 and Jamba-style hybrid language models under one definition."""

import os

# OpenMP threads that spin while waiting (GNU OpenMP's default) turn a busy CPU pathological: with torch's and
# numba's thread pools (two runtimes) alternating on 2 shared cores, a mamba-130m decode step measured 1-2 s
# instead of ~50 ms. Sleeping waiters cost a wake-up per parallel region instead (tens of microseconds here).
# Only effective when hybridlm is imported before torch (the CLI is); an explicit OMP_WAIT_POLICY wins.
# ``hybridlm bench`` runs peers in processes without this default (bench/peer_process.py).
OMP_WAIT_POLICY_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hybridlm.config import ModelConfig  # noqa: E402
from hybridlm.describe import describe  # noqa: E402
from hybridlm.model import HybridLM, ModelOutput  # noqa: E402
from hybridlm.state import InferenceState  # noqa: E402
from hybridlm.tokenizer import ByteTokenizer  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ByteTokenizer", "HybridLM", "InferenceState", "ModelConfig", "ModelOutput", "describe"]
