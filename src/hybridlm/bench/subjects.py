"""What the bench times: our model and the peers, behind one small interface.

A subject offers ``prefill(ids)`` (the prompt through the model, logits of the last position), ``decoder(context)``
(a function that decodes one more token after ``context`` tokens) and ``train_step(ids)`` (forward + backward
of the next-token loss). Peers that cannot do something return None for it (llama.cpp cannot train).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from hybridlm.config import ModelConfig
from hybridlm.layers.attention import KVCache
from hybridlm.model import HybridLM
from hybridlm.state import InferenceState

PEERS = ("hf", "mambapy", "llamacpp")


def state_at_context(model: HybridLM, context: int, extra: int = 64) -> InferenceState:
    """An inference state as after ``context`` tokens, built directly: KV caches hold ``context`` random keys
    and values, SSM states random values. A decode step costs the same as after a real prefill (it reads the
    same bytes), without spending minutes prefilling 64K tokens through attention."""
    state = model.init_state(1, max_len=context + extra)
    gen = torch.Generator().manual_seed(0)
    for layer in state.layers:
        if isinstance(layer, KVCache):
            shape = layer.k[:, :, :context].shape  # a ring buffer (sliding window): its window of them
            k, v = (torch.randn(shape, generator=gen, dtype=layer.k.dtype) * 0.5 for _ in range(2))
            layer.append(k, v)
            layer.advance(context - shape[2])  # the positions before the window: RoPE and the ring's slot move on
        else:
            for t in (layer.conv, layer.ssm):
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.1)
    state.seqlen = context
    return state


class Ours:
    name = "hybridlm"

    def __init__(self, model: HybridLM) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        state = self.model.init_state(ids.shape[0], max_len=ids.shape[1] + 1)
        self.model(ids, state=state, logits_to_keep=1)

    def decoder(self, context: int) -> Callable[[], None]:
        state = state_at_context(self.model, context)
        token = torch.tensor([[1]])

        @torch.no_grad()
        def step() -> None:
            nonlocal token
            logits = self.model(token, state=state, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True) % self.model.config.vocab_size

        return step

    def train_step(self, ids: torch.Tensor) -> None:
        self.model.zero_grad(set_to_none=True)
        out = self.model(ids, labels=ids)
        (out.loss + self.model.config.moe_aux_loss_coef * out.aux_loss).backward()


class HuggingFace:
    """The same weights in transformers' class for the family (saved by our exporter, loaded by theirs)."""

    name = "hf"

    def __init__(self, model: HybridLM) -> None:
        from transformers import AutoModelForCausalLM


        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "m", format="hf")
            self.model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32).eval()
        self.vocab = model.config.vocab_size

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        self.model(ids, use_cache=True, logits_to_keep=1)

    def decoder(self, context: int) -> Callable[[], None]:
        ids = torch.randint(0, self.vocab, (1, context))
        with torch.no_grad():
            out = self.model(ids, use_cache=True, logits_to_keep=1)
        # The cache's name, as output field and forward argument alike: ``cache`` in recent transformers (which
        # deprecates the others), ``past_key_values`` (attention models) or ``cache_params`` (Mamba) before.
        name = next(n for n in ("cache", "past_key_values", "cache_params") if getattr(out, n, None) is not None)
        cache = getattr(out, name)
        token = out.logits[:, -1:].argmax(-1)
        position = context

        @torch.no_grad()
        def step() -> None:
            nonlocal token, cache, position
            res = self.model(token, use_cache=True, logits_to_keep=1, cache_position=torch.tensor([position]),
                             **{name: cache})
            cache = getattr(res, name)
            token = res.logits[:, -1:].argmax(-1)
            position += 1

        return step

    def train_step(self, ids: torch.Tensor) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model(ids, labels=ids).loss.backward()


class MambaPy:
    """mambapy's Mamba-1 LM (pure PyTorch, parallel scan for prompts), same shape, its own random weights."""

    name = "mambapy"

    def __init__(self, model: HybridLM) -> None:
        # mambapy.lm imports its Mamba-2 module, which needs mamba_ssm (CUDA); its Mamba-1 stack does not, so
        # the LM (embedding -> Mamba stack -> RMSNorm -> tied head) is assembled here from mambapy.mamba.
        from mambapy.mamba import Mamba, MambaConfig, RMSNorm

        c = model.config
        if c.family != "mamba" or c.mamba_inner_norms:
            raise ValueError(f"mambapy runs plain Mamba-1 models, not {c.family}")
        config = MambaConfig(d_model=c.d_model, n_layers=c.n_layers, d_state=c.d_state, expand_factor=c.expand,
                             d_conv=c.d_conv, dt_rank=c.dt_rank, conv_bias=c.conv_bias, bias=c.proj_bias)

        class LM(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embedding = torch.nn.Embedding(c.padded_vocab_size, c.d_model)
                self.mamba = Mamba(config)
                self.norm_f = RMSNorm(c.d_model, c.norm_eps)

            def forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
                x = self.norm_f(self.mamba(self.embedding(ids)))
                return (x[:, -logits_to_keep:] if logits_to_keep else x) @ self.embedding.weight.T

            def step(self, token: torch.Tensor, caches: list) -> tuple[torch.Tensor, list]:
                x, caches = self.mamba.step(self.embedding(token), caches)
                return self.norm_f(x) @ self.embedding.weight.T, caches

        self.model = LM().eval()
        self.config = config
        self.vocab = c.vocab_size

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        self.model(ids, logits_to_keep=1)  # the last position's logits only, as ours and HF's prefill

    def decoder(self, context: int) -> Callable[[], None]:
        # mambapy has no prompt-to-cache path; its step cost does not depend on the context (fixed state).
        c = self.config
        caches = [(None, torch.zeros(1, c.d_inner, c.d_conv - 1)) for _ in range(c.n_layers)]
        token = torch.tensor([1])

        @torch.no_grad()
        def step() -> None:
            nonlocal token, caches
            logits, caches = self.model.step(token, caches)
            token = logits.argmax(-1) % self.vocab

        return step

    def train_step(self, ids: torch.Tensor) -> None:
        self.model.zero_grad(set_to_none=True)
        logits = self.model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()


class LlamaCpp:
    """The same weights exported to GGUF (float32) and run by llama-cpp-python at the same thread count."""

    name = "llamacpp"

    def __init__(self, model: HybridLM, threads: int, max_context: int) -> None:
        import llama_cpp

        from hybridlm.interop.gguf import export_gguf

        self._dir = tempfile.TemporaryDirectory()
        path = Path(self._dir.name) / "model.gguf"
        export_gguf(model, path, dtype=torch.float32)
        self.vocab = model.config.vocab_size
        self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=max_context,
                                   n_batch=min(max_context, 2048), n_ubatch=min(max_context, 512),
                                   logits_all=False, verbose=False)

    def prefill(self, ids: torch.Tensor) -> None:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())

    def decoder(self, context: int) -> Callable[[], None]:
        self.llm.reset()
        self.llm.eval(torch.randint(0, self.vocab, (context,)).tolist())

        def step() -> None:
            if self.llm.n_tokens >= self.llm.n_ctx() - 1:
                raise RuntimeError("llama.cpp context full")
            self.llm.eval([1])

        return step

    train_step = None


def make_peer(name: str, model: HybridLM, threads: int, max_context: int):
    """The peer ``name`` for ``model``; raises ImportError/ValueError when it cannot run it."""
    if name == "hf":
        return HuggingFace(model)
    if name == "mambapy":
        return MambaPy(model)
    if name == "llamacpp":
        return LlamaCpp(model, threads, max_context)
    raise ValueError(f"peer: unknown {name!r}; expected one of {PEERS}")


def build_model(preset: str, seed: int = 0) -> HybridLM:
    """A randomly initialised model of ``preset`` (float32)."""
    torch.manual_seed(seed)
    return HybridLM(ModelConfig.preset(preset)).eval()
