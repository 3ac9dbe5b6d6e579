"""LSH attention (Reformer, Kitaev et al. 2020): shared-QK causal attention over the keys of the query's hash bucket,
in several hash rounds; its KV cache keeps each key's buckets, so decode reads a few keys, not the whole context.

Options (``config.mixer_options[letter]``):

- ``n_buckets``: buckets per round (1, or even: angular LSH splits ±xR). One bucket with ``chunk_size`` >= the length
  is exact (shared-QK) causal attention.
- ``n_rounds``: hash rounds, merged by their softmax normalisers (Reformer: 8 at evaluation).
- ``chunk_size``: keys a query sees per round, the most recent of its bucket (Reformer's 64).
- ``seed``: draws the random rotations (layer i uses seed + i); they are a buffer, so a checkpoint keeps them.

Keys are the queries normalised (shared QK, as Reformer); a token attends to itself only when nothing else shares its
bucket. Heads are ``n_heads`` of ``head_dim``; shared QK leaves no room for grouped key/value heads. A decode step
reads each bucket's ring of recent keys (the state keeps one per head, round and bucket), so its cost does not grow
with the context; the KV cache does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.config import invalid
from hybridlm.layers.attention import KVCache
from hybridlm.layers.linear import Linear, project
from hybridlm.layers.mixer import mixer_options
from hybridlm.layers.rotary import Rotary
from hybridlm.ops.lsh_attention.hashing import hash_buckets, random_rotations

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig


@dataclass(frozen=True)
class LSHAttentionOptions:
    """The options of an LSH-attention mixer (see the module docstring), read from ``config.mixer_options``."""

    n_buckets: int = 8
    n_rounds: int = 4
    chunk_size: int = 64
    seed: int = 0

    @classmethod
    def of(cls, config: ModelConfig, letter: str) -> LSHAttentionOptions:
        """The options of the mixer of ``letter``, checked: ``config.invalid`` names the first bad one."""
        options, name = mixer_options(cls, config, letter, "LSH attention")
        for option, low in (("n_buckets", 1), ("n_rounds", 1), ("chunk_size", 1), ("seed", 0)):
            value = getattr(options, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise invalid(name(option), f"an integer >= {low}", value)
        if options.n_buckets > 1 and options.n_buckets % 2:
            raise invalid(name("n_buckets"), "1 or an even number (angular LSH takes the argmax over [xR; -xR])",
                          options.n_buckets)
        return options


@dataclass
class LSHCache:
    """The state of an LSH-attention layer: the KV cache of unit keys and values (``kv``) and, per head, round and
    bucket, the ring of its ``chunk`` most recent keys (``recent``), which is all a decode step reads.

    Keys are named by each sequence's own position t (padding included): key t of row i sits in slot
    ``kv.length - written[i] + t``. Selecting rows drops leading slots and joining right-aligns them, and neither
    moves a position against the end, so the rings survive continuous batching unchanged.
    """

    kv: KVCache
    recent: torch.Tensor  # (b, h, r, n_buckets, chunk) int64: positions t of each bucket's recent keys; -1: none yet
    filled: torch.Tensor  # (b, h, r, n_buckets) int64: keys each bucket has taken; its ring's next place is % chunk
    written: torch.Tensor  # (b,) int64: positions each sequence has written

    description: ClassVar[str] = "KV cache + LSH bucket rings"
    bound_tensors: ClassVar[tuple[str, ...]] = ()

    @property
    def length(self) -> int:
        return self.kv.length

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.recent.nbytes + self.filled.nbytes

    def nbytes_at(self, context: int) -> int:
        return self.kv.nbytes_at(context) + self.recent.nbytes + self.filled.nbytes

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        # positions: (b, ...) of each row's own keys -> their slots in the KV cache
        return positions + (self.kv.length - self.written).view(-1, *([1] * (positions.dim() - 1)))

    def append(self, keys: torch.Tensor, values: torch.Tensor, buckets: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Write l new positions: keys (b, h, l, d) unit, values (b, h, l, e), buckets (b, h, r, l), valid (b, l) or
        None; each bucket's ring takes its newest real keys (at most ``chunk`` of the new ones can stay)."""
        b, h, rounds, length = buckets.shape
        n_buckets, chunk = self.recent.shape[3], self.recent.shape[4]
        if valid is not None:  # padding joins a bucket past the real ones, which is then dropped
            buckets = torch.where(valid[:, None, None, :], buckets, n_buckets)
        positions = torch.arange(length, device=buckets.device)
        order = (buckets * length + positions).argsort(-1)  # by bucket, then position
        in_bucket = buckets.gather(-1, order)  # (b, h, r, l)
        counts = torch.zeros(b, h, rounds, n_buckets + 1, dtype=torch.long, device=buckets.device)
        counts.scatter_add_(-1, in_bucket, torch.ones_like(in_bucket))
        first = counts.cumsum(-1) - counts  # sorted place where each bucket starts
        k = positions - first.gather(-1, in_bucket)  # the key's place among its bucket's new keys
        keep = (k >= counts.gather(-1, in_bucket) - chunk) & (in_bucket < n_buckets)
        bucket = in_bucket.clamp(max=n_buckets - 1)
        place = (self.filled.gather(-1, bucket) + k) % chunk
        flat = (bucket * chunk + place).masked_fill(~keep, n_buckets * chunk)  # dropped ones: past the end
        table = torch.cat([self.recent.flatten(3), self.recent.new_empty(b, h, rounds, 1)], -1)
        table.scatter_(-1, flat, order + self.written.view(b, 1, 1, 1))
        self.recent.copy_(table[..., :-1].view_as(self.recent))
        self.filled += counts[..., :-1]
        self.kv.append(keys, values, valid)
        self.written += length

    def context(self, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached positions oldest first: unit keys (b, h, l, d), values (b, h, l, e), their buckets (b, h, r, l),
        hashed again with ``rotations`` (a key's bucket is its query's: hashing ignores length), and which are real
        tokens (b, l)."""
        keys, values, valid = self.kv.ordered()
        if valid is None:
            valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
        n_buckets = self.recent.shape[3]
        return keys, values, hash_buckets(keys, rotations, n_buckets), valid

    def select(self, rows: torch.Tensor, capacity: int = 0) -> LSHCache:
        return LSHCache(self.kv.select(rows, capacity), self.recent[rows], self.filled[rows], self.written[rows])

    @staticmethod
    def cat(states: Sequence[LSHCache], capacity: int = 0) -> LSHCache:
        return LSHCache(KVCache.cat([s.kv for s in states], capacity), torch.cat([s.recent for s in states]),
                        torch.cat([s.filled for s in states]), torch.cat([s.written for s in states]))


class LSHAttention(nn.Module):
    """Shared q/k projection (+ rotary), v projection, LSH attention (sorted chunks for a sequence, the bucket's recent
    keys for a decode step), o_proj."""

    kind = "lsh_attention"
    label = "LSH attention"
    semantic_fields = ("n_heads", "head_dim", "rope_theta")

    @staticmethod
    def check_config(config: ModelConfig, letter: str) -> None:
        if config.n_kv_heads != config.n_heads:
            raise invalid("n_kv_heads", f"n_heads={config.n_heads}: LSH attention shares queries and keys, one key a "
                          "query head", config.n_kv_heads)
        if config.rope_theta is not None and config.head_dim % 2:
            raise invalid("head_dim", "an even number (rotary embeddings rotate pairs)", config.head_dim)
        LSHAttentionOptions.of(config, letter)

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        options = self.options = LSHAttentionOptions.of(config, config.layers[layer_idx])
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        d, width = config.d_model, config.n_heads * config.head_dim
        self.qk_proj = Linear(d, width, bias=config.attn_bias)
        self.v_proj = Linear(d, width, bias=config.attn_bias)
        self.o_proj = Linear(width, d, bias=config.attn_bias)
        self.rotary = None if config.rope_theta is None else Rotary(self.head_dim, config.rope_theta)
        self.register_buffer("rotations", random_rotations(self.n_heads, options.n_rounds, self.head_dim,
                                                           options.n_buckets, seed=options.seed + layer_idx))

    def init_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   max_len: int = 0) -> LSHCache:
        dtype = dtype or self.qk_proj.weight.dtype
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        kv = KVCache(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype),
                     n_real=torch.zeros(batch_size, dtype=torch.long, device=device))
        o = self.options
        rings = (batch_size, self.n_heads, o.n_rounds, o.n_buckets)
        return LSHCache(kv, torch.full((*rings, o.chunk_size), -1, dtype=torch.long, device=device),
                        torch.zeros(rings, dtype=torch.long, device=device),
                        torch.zeros(batch_size, dtype=torch.long, device=device))

    def _qk_v(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (b, l, d_model)  positions: (b, l) -> qk, v (b, h, l, head_dim) and the buckets (b, h, r, l)
        b, length, _ = x.shape
        qk, v = project(x, (self.qk_proj, self.v_proj))
        qk = qk.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            qk, _ = self.rotary(qk, qk, positions)
        return qk, v, hash_buckets(qk, self.rotations, self.options.n_buckets)

    def forward(self, x: torch.Tensor, state: LSHCache | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x: (b, l, d_model), mask: (b, l) bool, False at (left-)padding -> (b, l, d_model)
        b, length, _ = x.shape
        steps = (torch.arange(length, device=x.device).expand(b, length) if mask is None
                 else (mask.long().cumsum(1) - 1).clamp(min=0))
        qk, v, buckets = self._qk_v(x, steps if state is None else steps + state.kv.n_real[:, None])
        chunk = self.options.chunk_size
        if state is None or state.length == 0:
            y = ops.lsh_attention(qk, v, buckets, chunk, mask)
        else:  # after a cached context: the new queries over the cached keys and theirs (the old outputs dropped)
            keys, values, old_buckets, real = state.context(self.rotations)
            valid = torch.cat([real, real.new_ones(b, length) if mask is None else mask.bool()], 1)
            y = ops.lsh_attention(torch.cat([keys, qk], 2), torch.cat([values, v], 2),
                                  torch.cat([old_buckets, buckets], 3), chunk, valid)[:, :, -length:]
        if state is not None:
            state.append(F.normalize(qk, dim=-1), v, buckets, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim))

    def step(self, x: torch.Tensor, state: LSHCache) -> torch.Tensor:
        # x: (b, 1, d_model) -> (b, 1, d_model): the new key joins its buckets' rings, the query reads those rings: at
        # most n_rounds * chunk keys, however long the context
        b = x.shape[0]
        qk, v, buckets = self._qk_v(x, state.kv.n_real[:, None])
        state.append(F.normalize(qk, dim=-1), v, buckets)
        ring = state.recent.gather(3, buckets[..., None].expand(-1, -1, -1, -1, self.options.chunk_size))[:, :, :, 0]
        y = ops.lsh_decode_attention(qk, state.kv.k, state.kv.v, state.slots(ring).masked_fill(ring < 0, -1),
                                     state.kv.length - 1)
        return self.o_proj(y.reshape(b, 1, self.n_heads * self.head_dim))

    def prefill_work(self, length: int) -> tuple[float, float]:
        """(FLOPs, exps) per token beyond the projections, per round: hashing (d x n_buckets/2), q·k and p·v over the
        two chunks a sorted chunk sees (2 FLOPs a multiply-add)."""
        r, c, d = self.options.n_rounds, min(self.options.chunk_size, length), self.head_dim
        per_head = r * (2.0 * d * max(1, self.options.n_buckets // 2) + 4.0 * 2 * c * d)
        return self.n_heads * per_head, float(self.n_heads * r * 2 * c)
