"""hybridlm: Transformer, Mamba-1/2 and Jamba-style hybrid language models under one definition."""

from hybridlm.config import ModelConfig
from hybridlm.describe import describe
from hybridlm.model import HybridLM, ModelOutput
from hybridlm.state import InferenceState
from hybridlm.tokenizer import ByteTokenizer

__version__ = "0.1.0"

__all__ = ["ByteTokenizer", "HybridLM", "InferenceState", "ModelConfig", "ModelOutput", "describe"]
