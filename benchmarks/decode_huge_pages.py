"""Decode with the weights in huge pages (as ``HybridLM`` places them on CPU) against the same weights in torch's
own allocations, two identical models in one process, timed in interleaved tokens.

    python benchmarks/decode_huge_pages.py --presets mamba-130m mamba2-130m llama-130m jamba-130m --tokens 80

Each preset runs twice, with the two models made in both orders (a harness comparing two models in one process
favoured the one made second by ~2% in earlier tests). Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numba
import torch

from hybridlm import HybridLM, ModelConfig


def _in_torch_memory(model: HybridLM) -> HybridLM:
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            p.data = p.data.clone()  # a fresh torch allocation (4 KiB pages)
    return model


def _compare(preset: str, placed_first: bool, tokens: int) -> dict:
    models = {}
    for kind in ("huge_pages", "torch") if placed_first else ("torch", "huge_pages"):
        torch.manual_seed(0)
        model = HybridLM(ModelConfig.preset(preset)).eval()
        models[kind] = _in_torch_memory(model) if kind == "torch" else model
    states = {kind: m.init_state(1) for kind, m in models.items()}
    token, prompt = torch.tensor([[5]]), torch.randint(0, 256, (1, 64))
    times: dict[str, list[float]] = {kind: [] for kind in models}
    with torch.no_grad():
        for kind, m in models.items():
            m(prompt, state=states[kind], logits_to_keep=1)
            for _ in range(3):
                m(token, state=states[kind], logits_to_keep=1)
        for i in range(tokens):
            for kind in ("huge_pages", "torch") if i % 2 else ("torch", "huge_pages"):
                start = time.perf_counter()
                models[kind](token, state=states[kind], logits_to_keep=1)
                times[kind].append(time.perf_counter() - start)
    placed, plain = statistics.median(times["huge_pages"]), statistics.median(times["torch"])
    return dict(preset=preset, made_first="huge_pages" if placed_first else "torch", huge_pages_ms=placed * 1e3,
                torch_ms=plain * 1e3, time_ratio=placed / plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["mamba-130m", "mamba2-130m", "llama-130m", "jamba-130m"])
    parser.add_argument("--tokens", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    rows = []
    print(f"{'preset':>12} {'made first':>11} {'huge pages ms':>14} {'torch memory ms':>16} {'ratio':>6}")
    for preset in args.presets:
        for placed_first in (False, True):
            row = _compare(preset, placed_first, args.tokens)
            rows.append(row)
            print(f"{preset:>12} {row['made_first']:>11} {row['huge_pages_ms']:14.2f} {row['torch_ms']:16.2f} "
                  f"{row['time_ratio']:6.3f}")
    print(json.dumps(dict(threads=args.threads, tokens=args.tokens, results=rows)))


if __name__ == "__main__":
    main()
