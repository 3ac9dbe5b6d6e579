"""Multi-head / grouped-query causal self-attention with rotary positions, optionally local (sliding window), and its
KV cache: growing, or a ring buffer of the window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numba
import numpy as np
import torch
from torch import nn

from hybridlm import ops
from hybridlm.config import invalid
from hybridlm.layers.linear import Linear, project
from hybridlm.layers.norm import RMSNorm, block_arguments
from hybridlm.layers.numpy_views import kernel_arguments
from hybridlm.layers.rotary import Rotary
from hybridlm.ops.attention.numba_ops import heads_per_task
from hybridlm.ops.attention.torch_ops import sdpa, sliding_window_attention
from hybridlm.ops.step.attention import NO_MASK, AttentionLayer
from hybridlm.ops.step.block import EMPTY

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of the positions attention can still see, preallocated and grown in place (amortised): every
    position seen so far, or with ``window`` (sliding-window attention) the last ``window`` in a ring buffer, position
    p in slot p % window. Keys carry their RoPE rotation already and softmax does not care about order, so where a
    key sits does not matter, only whether it is valid; the bytes held stop growing at ``window`` positions.

    ``advance`` is the one place its counters move. The slots held are ``[0, held)``. Positions from ``length`` on are
    always marked valid in a full cache, and a ring's writes mark their slots (a kernel that writes the next position
    itself, the fused decode step, marks it too), so the newest key is always valid.
    """

    k: torch.Tensor  # (b, h_kv, capacity, d)
    v: torch.Tensor  # (b, h_kv, capacity, d)
    n_real: torch.Tensor  # (b,) real (non-padding) tokens seen per sequence: the next RoPE position
    key_valid: torch.Tensor | None = None  # (b, capacity) bool; None while no padding has been seen
    length: int = 0  # positions seen (padding included); the next one goes in slot length (% window)
    window: int | None = None  # sliding window: positions kept (the capacity never exceeds it); None keeps all

    bound_tensors: ClassVar[tuple[str, ...]] = ()  # none: the cache moves as it grows, a bound step looks it up

    @property
    def description(self) -> str:
        return "KV cache" if self.window is None else f"KV cache (ring buffer of {self.window} positions)"

    @property
    def held(self) -> int:
        """Positions held: slots ``[0, held)`` are filled."""
        return self.length if self.window is None else min(self.length, self.window)

    def nbytes(self) -> int:
        held = self.k.nbytes + self.v.nbytes
        return held + (0 if self.key_valid is None else self.key_valid.nbytes)

    def nbytes_at(self, context: int) -> int:
        """Bytes of keys and values after ``context`` tokens (without the padding mask)."""
        b, h_kv, _, d = self.k.shape
        return 2 * b * h_kv * d * self.k.element_size() * (context if self.window is None else min(context,
                                                                                                     self.window))

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more positions (doubling the capacity when short, so growth is amortised; a ring
        grows to its window at most)."""
        need, capacity = self.length + n, self.k.shape[2]
        if self.window is not None:
            need = min(need, self.window)
        if need > capacity:
            grown = max(need, 2 * capacity)
            self._grow(grown if self.window is None else min(grown, self.window))

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Write keys and values at the next positions and advance. ``valid``: which are real tokens (None: all). A
        ring keeps the last ``window`` of them: the older ones are outside every later query's window."""
        # k, v: (b, h_kv, l, d)   valid: (b, l) bool or None
        n = k.shape[2]
        self.reserve(n)
        if valid is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.k.shape[0], self.k.shape[2], dtype=torch.bool, device=k.device)
        kept = n if self.window is None else min(n, self.window)
        # A full cache's positions from length on are valid already; a ring's slot may hold an old padding key
        mark = self.key_valid is not None and (valid is not None or self.window is not None)
        for slots, part in self._spans(self.length + n - kept, kept):
            part = slice(n - kept + part.start, n - kept + part.stop)
            self.k[:, :, slots] = k[:, :, part]
            self.v[:, :, slots] = v[:, :, part]
            if mark:
                self.key_valid[:, slots] = True if valid is None else valid[:, part]
        self.advance(n, valid)

    def advance(self, n: int, valid: torch.Tensor | None = None) -> None:
        """Count ``n`` positions written at ``[length, length + n)`` (their slots); ``valid`` (b, n): which are real
        tokens, each sequence's next RoPE position moving by those (None: all)."""
        self.length += n
        self.n_real += n if valid is None else valid.sum(1)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The held positions oldest first: k, v (b, h_kv, held, d) and their validity (b, held) or None. Views of
        the cache until a ring has wrapped, copies after."""
        held = self.held
        k, v = self.k[:, :, :held], self.v[:, :, :held]
        valid = None if self.key_valid is None else self.key_valid[:, :held]
        oldest = 0 if self.window is None or self.length <= self.window else self.length % self.window
        if oldest:
            k, v = k.roll(-oldest, 2), v.roll(-oldest, 2)
            valid = None if valid is None else valid.roll(-oldest, 1)
        return k, v, valid

    def select(self, rows: torch.Tensor, capacity: int = 0) -> KVCache:
        """A new cache holding only sequences ``rows`` (b',) of this one, with at least ``capacity`` positions (a
        ring: at most its window).

        Leading positions that are padding in every kept row are dropped: keys carry their RoPE rotation
        already, so where a key sits in the cache does not matter, only its validity does.
        """
        k, v, valid = self.ordered()
        first = 0
        if valid is not None:
            valid = valid[rows]
            used = valid.any(0).nonzero()
            first = int(used[0]) if len(used) else valid.shape[1]
            valid = valid[:, first:]
        return KVCache._filled([(k[rows, :, first:], v[rows, :, first:], valid)], self.n_real[rows], capacity,
                               self.window)

    @staticmethod
    def cat(caches: list[KVCache], capacity: int = 0) -> KVCache:
        """The caches' sequences stacked into one batch; shorter ones are left-padded (marked invalid)."""
        return KVCache._filled([c.ordered() for c in caches], torch.cat([c.n_real for c in caches]), capacity,
                               caches[0].window)

    @staticmethod
    def _filled(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], n_real: torch.Tensor,
                capacity: int, window: int | None) -> KVCache:
        # parts: (k (b_i, h_kv, l_i, d), v (same), valid (b_i, l_i) bool or None), oldest first, right-aligned at
        # max l_i (at most ``window``: a ring is laid out unwrapped, position p in slot p)
        length = max(k.shape[2] for k, _, _ in parts)
        k0 = parts[0][0]
        batch = sum(k.shape[0] for k, _, _ in parts)
        slots = max(length, capacity) if window is None else min(max(length, capacity), window)
        shape = (batch, k0.shape[1], slots, k0.shape[3])
        out = KVCache(k0.new_empty(shape), k0.new_empty(shape), n_real.clone(), length=length, window=window)
        padded = any(valid is not None or k.shape[2] < length for k, _, valid in parts)
        if padded:
            out.key_valid = torch.ones(batch, shape[2], dtype=torch.bool, device=k0.device)
        row = 0
        for k, v, valid in parts:
            rows, start = slice(row, row + k.shape[0]), length - k.shape[2]
            out.k[rows, :, start:length], out.v[rows, :, start:length] = k, v
            if padded:  # finite padding: a masked key still enters SDPA's matmuls, and 0 * NaN is NaN
                out.k[rows, :, :start], out.v[rows, :, :start] = 0, 0
                out.key_valid[rows, :start] = False
                if valid is not None:
                    out.key_valid[rows, start:length] = valid
            row += k.shape[0]
        return out

    def _spans(self, start: int, count: int) -> list[tuple[slice, slice]]:
        # The slots of positions [start, start + count) as (slots, which of the count) slices: one span, or two
        # where a ring wraps (count <= window)
        if self.window is None:
            return [(slice(start, start + count), slice(0, count))]
        first = start % self.window
        head = min(count, self.window - first)
        spans = [(slice(first, first + head), slice(0, head))]
        if head < count:
            spans.append((slice(0, count - head), slice(head, count)))
        return spans

    def _grow(self, capacity: int) -> None:
        held = self.held  # a ring grows only before it wraps: its positions sit in slots [0, held) in order

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(*t.shape[:2], capacity, t.shape[3])
            out[:, :, :held] = t[:, :, :held]
            return out

        self.k, self.v = grown(self.k), grown(self.v)
        if self.key_valid is not None:
            valid = self.key_valid.new_ones(self.key_valid.shape[0], capacity)
            valid[:, :held] = self.key_valid[:, :held]
            self.key_valid = valid


class Attention(nn.Module):
    """Causal self-attention: q/k/v projections, rotary positions (optional), SDPA, o_proj; with
    ``config.sliding_window`` each query sees only itself and the window - 1 positions before it."""

    kind = "attention"
    label = "attention"
    # The config fields that decide what it computes (interop checks a stored config against them)
    semantic_fields = ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "attn_bias", "sliding_window")

    @staticmethod
    def check_config(config: ModelConfig, letter: str) -> None:
        if config.n_heads % config.n_kv_heads:
            raise invalid("n_kv_heads", f"a divisor of n_heads={config.n_heads}", config.n_kv_heads)
        if config.rope_theta is not None and config.head_dim % 2:
            raise invalid("head_dim", "an even number (rotary embeddings rotate pairs)", config.head_dim)
        window = config.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise invalid("sliding_window", "a positive integer (positions each query sees) or None", window)

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d, hd, bias = config.d_model, config.head_dim, config.attn_bias
        self.q_proj = Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = Linear(d, self.n_kv_heads * hd, bias=bias)
        self.v_proj = Linear(d, self.n_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.n_heads * hd, d, bias=bias)
        self.rotary = None if config.rope_theta is None else Rotary(hd, config.rope_theta)
        self.window = config.sliding_window

    def init_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   max_len: int = 0) -> KVCache:
        dtype = dtype or self.q_proj.weight.dtype
        capacity = max_len if self.window is None else min(max_len, self.window)
        shape = (batch_size, self.n_kv_heads, capacity, self.head_dim)
        return KVCache(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype),
                       n_real=torch.zeros(batch_size, dtype=torch.long, device=device), window=self.window)

    def forward(self, x: torch.Tensor, state: KVCache | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x: (b, l, d_model), mask: (b, l) bool, False at (left-)padding -> (b, l, d_model)
        b, length, _ = x.shape
        steps = (torch.arange(length, device=x.device).expand(b, length) if mask is None
                 else (mask.long().cumsum(1) - 1).clamp(min=0))
        q, k, v = self.queries_keys_values(x, steps if state is None else steps + state.n_real[:, None])
        if state is None:
            key_valid = mask
        elif self.window is None:
            state.append(k, v, mask)
            k, v = state.k[:, :, : state.length], state.v[:, :, : state.length]
            key_valid = None if state.key_valid is None else state.key_valid[:, : state.length]
        else:
            k, v, key_valid = self._window_keys(state, k, v, mask)
        if self.window is not None and k.shape[2] > self.window:  # banded, never an (l, keys) mask
            y = sliding_window_attention(q, k, v, self.window, key_valid)
        else:  # the window (if any) reaches every key: causal attention
            y = sdpa(q, k, v, *_causal_mask(length, k.shape[2], key_valid, x.device))
        return self.o_proj(y.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim))

    def queries_keys_values(self, x: torch.Tensor, positions: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's inputs for ``x`` (b, l, d_model) at ``positions`` (b, l; default 0 .. l-1): q (b, h, l, d),
        k and v (b, h_kv, l, d), q and k rotated (the bench measures approximations of attention on them)."""
        b, length, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            if positions is None:
                positions = torch.arange(length, device=x.device).expand(b, length)
            q, k = self.rotary(q, k, positions)
        return q, k, v

    def _window_keys(self, state: KVCache, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # k, v: (b, h_kv, l, d) the new keys  mask: (b, l) or None -> the keys the new queries can reach, oldest
        # first: the ring's last window - 1 positions then the new ones, (b, h_kv, <= window - 1 + l, d), and their
        # validity (b, same) or None; the new keys are then written to the ring
        old_k, old_v, old_valid = state.ordered()
        keep = min(old_k.shape[2], self.window - 1)  # an older key is outside every new query's window
        old_k, old_v = old_k[:, :, old_k.shape[2] - keep:], old_v[:, :, old_v.shape[2] - keep:]
        keys, values = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)  # copies: the ring is written next
        valid = None
        if old_valid is not None or mask is not None:
            b, length = k.shape[0], k.shape[2]
            valid = torch.cat([old_k.new_ones(b, keep, dtype=torch.bool) if old_valid is None
                               else old_valid[:, old_valid.shape[1] - keep:],
                               k.new_ones(b, length, dtype=torch.bool) if mask is None else mask.bool()], 1)
        state.append(k, v, mask)
        return keys, values, valid

    def prefill_work(self, length: int) -> tuple[float, float]:
        """(FLOPs, exps) per token of a causal prefill of ``length`` tokens beyond the projections: q.k and p.v over
        length / 2 keys on average (at most the window, when there is one), 2 FLOPs a multiply-add."""
        if self.window is None or length <= self.window:
            keys = length / 2
        else:  # the first window tokens see (window + 1) / 2 keys on average, the rest window keys each
            keys = self.window - self.window * (self.window - 1) / (2 * length)
        return 4.0 * keys * self.n_heads * self.head_dim, 0.0

    def step(self, x: torch.Tensor, state: KVCache) -> torch.Tensor:
        # x: (b, 1, d_model) -> (b, 1, d_model), the new key and value appended to the cache; reads the cache once,
        # makes no tensor shaped by the context (the fused CPU kernel is ``bind_step``'s)
        b, hd = x.shape[0], self.head_dim
        q, k, v = project(x[:, 0], (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, self.n_heads, 1, hd)
        k = k.view(b, self.n_kv_heads, 1, hd)
        v = v.view(b, self.n_kv_heads, 1, hd)
        if self.rotary is not None:
            q, k = self.rotary(q, k, state.n_real[:, None])
        state.append(k, v)
        y = ops.decode_attention(q, state.k, state.v, state.held, state.key_valid)
        return self.o_proj(y.view(b, self.n_heads * hd))[:, None]

    def bind_step(self, state: KVCache, norm: RMSNorm | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
        """This mixer's decode step as a call on float32 arrays, hidden (b, d_model) -> (b, d_model), with its weights,
        the KV cache ``state`` and the block's ``norm`` (for ``hidden + mixer(norm(hidden))``) bound; None where the
        dispatch picks the torch step or the tensors are outside the kernel's domain. Each call appends to the
        cache, growing it when full (a ring: writing over its oldest slot once it holds the window)."""
        kernel = ops.step_kernel("attention_step")
        weights, block = kernel_arguments(self, _kernel_weights), block_arguments(norm)
        if (kernel is None or weights is None or block is None or state.k.dtype != torch.float32
                or state.k.device.type != "cpu"):
            return None
        residual, norm_w, norm_eps = block
        per_task = heads_per_task(state.k.shape[0], self.n_heads, self.n_kv_heads, numba.get_num_threads())
        layer = AttentionLayer(norm_w, norm_eps, per_task=per_task, **weights)

        window = state.window

        def step(hidden: np.ndarray) -> np.ndarray:
            state.reserve(1)  # may move the cache: its arrays are looked up on every call
            valid, length = state.key_valid, state.length
            slot, keys = (length, length + 1) if window is None else (length % window, min(length + 1, window))
            out = kernel(residual, layer, state.n_real.numpy(), state.k.numpy(), state.v.numpy(), slot, keys,
                         NO_MASK if valid is None else valid.numpy(), valid is not None, hidden)
            state.advance(1)
            return out

        return step


def _causal_mask(length: int, keys: int, key_valid: torch.Tensor | None, device: torch.device
                 ) -> tuple[torch.Tensor | None, bool]:
    # key_valid: (b, keys) bool or None -> SDPA's (attn_mask broadcastable to (b, h, length, keys), is_causal) for
    # ``length`` queries that are the last of ``keys`` positions
    past = keys - length  # keys before the first query
    if key_valid is None and past == 0:
        return None, length > 1
    if key_valid is None and length == 1:
        return None, False  # one query after the cache: it sees every key
    # Query i sits at position past + i and sees keys j <= past + i that are not padding; it always sees itself,
    # so a padding query's row is never empty (no NaN).
    positions = torch.arange(keys, device=device)
    query_pos = past + torch.arange(length, device=device)[:, None]
    attn_mask = positions <= query_pos
    if key_valid is not None:
        attn_mask = (attn_mask & key_valid[:, None, None, :]) | (positions == query_pos)
    return attn_mask, False


def _kernel_weights(mixer: Attention, w: dict[str, np.ndarray]) -> dict:
    # AttentionLayer's fields from W_qkv to b_o, from the mixer's parameters and buffers (numpy views ``w``)
    projs = ("q_proj", "k_proj", "v_proj", "o_proj")
    biases = tuple(w.get(f"{p}.bias", EMPTY) for p in projs)
    return dict(W_qkv=(w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"]), b_qkv=biases[:3],
                has_bias=np.array([f"{p}.bias" in w for p in projs]), inv_freq=w.get("rotary.inv_freq", EMPTY),
                rotary="rotary.inv_freq" in w, W_o=w["o_proj.weight"], b_o=biases[3])
