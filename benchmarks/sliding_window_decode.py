"""Decode-step time and KV bytes of a sliding-window model at a short and a long context.

    python benchmarks/sliding_window_decode.py --preset llama-130m --window 512 --contexts 512 65536

Random weights, fp32, batch 1, the bound (fused) decode step. Each context's state is built directly
(``bench.subjects.state_at_context``: the ring holds ``window`` random keys, its counters at the context), so a long
context costs no prefill. Steps at the contexts are interleaved, a copy of each state per round, and the median of
``--rounds`` rounds of ``--steps`` steps is reported with the ratio to the first context. With a window, a decode
step reads at most ``window`` keys whatever the context: the ratio should stay near 1 and the bytes constant.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.bench.subjects import state_at_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-130m")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 65536])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig.preset(args.preset), sliding_window=args.window)
    model = HybridLM(config).eval()
    states = {n: state_at_context(model, n) for n in args.contexts}
    token = torch.zeros(1, 1, dtype=torch.long)
    times: dict[int, list[float]] = {n: [] for n in args.contexts}
    with torch.no_grad():
        for n in args.contexts:  # warm-up: compile and bind
            model(token, state=copy.deepcopy(states[n]))
        for _ in range(args.rounds):
            for n in args.contexts:
                state = copy.deepcopy(states[n])
                start = time.perf_counter()
                for _ in range(args.steps):
                    model(token, state=state, logits_to_keep=1)
                times[n].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times[args.contexts[0]])
    print(f"{args.preset}, sliding_window {args.window}, {args.threads} threads, fp32, batch 1, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    for n in args.contexts:
        median = statistics.median(times[n])
        kv = sum(layer.nbytes() for layer in states[n].layers)
        print(f"  context {n:>7,}: {median * 1e3:7.2f} ms/token  ({median / base:.2f}x)  KV {kv / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
