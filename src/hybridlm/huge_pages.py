"""A CPU model's weights in transparent huge pages, for the decode step that streams them every token.

Decoding reads every weight once a token: ~0.5 GB for a 130M model in float32. In 4 KiB pages that is ~126,000
pages, most of them a TLB miss; in 2 MiB pages, ~250. torch's CPU allocator does not ask for huge pages, and
Linux's usual setting (THP "madvise") gives them only to memory that does, so ``place_parameters`` moves a
module's parameters into one anonymous mapping advised ``MADV_HUGEPAGE``. The decode time it saves:
``python benchmarks/decode_huge_pages.py`` (figures in docs/performance.md).
"""

from __future__ import annotations

import contextlib
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 * 2**20
ALIGN = 64  # each tensor starts on a cache line
MIN_BYTES = 16 * 2**20  # smaller models (tests, toys) span a few huge pages at most: left where they are


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 CPU tensor of ``nbytes`` bytes starting on a 2 MiB boundary, in an anonymous mapping
    advised for transparent huge pages (which the OS may or may not grant). Its memory lives as long as any
    tensor viewing it."""
    # private: a shared anonymous mapping is shmem, whose huge pages follow another, usually disabled, setting
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages: ordinary pages, still valid
        mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def place_parameters(module: nn.Module, min_bytes: int | None = None) -> bool:
    """Move ``module``'s contiguous CPU parameters into one huge-page mapping, keeping their values, their
    ``Parameter`` objects (optimizers and tied weights see no change) and ``requires_grad``. Parameters that
    share storage as different tensors stay where they are (moving them apart would untie them). Returns whether
    anything moved: nothing does off Linux (no ``MADV_HUGEPAGE``) or below ``min_bytes`` (default ``MIN_BYTES``)
    in all."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    by_storage: dict[int, list[nn.Parameter]] = {}
    for p in {id(p): p for p in module.parameters()}.values():
        if p.device.type == "cpu" and p.numel() > 0:
            by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(p)
    movable = [ps[0] for ps in by_storage.values() if len(ps) == 1 and ps[0].is_contiguous()]
    sizes = [-(-p.nbytes // ALIGN) * ALIGN for p in movable]
    if sum(sizes) < max(MIN_BYTES if min_bytes is None else min_bytes, 1):
        return False
    arena = huge_page_bytes(sum(sizes))
    offset = 0
    # One parameter at a time, each old storage freed once copied: the peak is the model plus one parameter.
    with torch.no_grad():
        for p, size in zip(movable, sizes, strict=True):
            placed = arena[offset:offset + p.nbytes].view(p.dtype).view(p.shape)
            placed.copy_(p)
            p.data = placed
            offset += size
    return True
