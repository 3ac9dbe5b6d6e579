"""LSH attention's decode step against exact decode attention over the same cache, by context length.

The LSH step reads its buckets' rings of recent keys (at most n_rounds * chunk keys and values, wherever they sit in
the cache); exact decode reads every key and value. Both are the torch forms (``ops.lsh_decode_attention`` and
``decode_attention_torch``, SDPA), one new query per step, heads of 64. Prints a table and JSON.

    python benchmarks/lsh_decode.py [--threads 2] [--contexts 1024,8192,65536]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from hybridlm.ops.attention.torch_ops import decode_attention_torch
from hybridlm.ops.lsh_attention.decode import lsh_decode_attention


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default="1024,4096,16384,65536")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        g = torch.Generator().manual_seed(context)
        keys = F.normalize(torch.randn(1, args.heads, context, 64, generator=g), dim=-1)
        values = torch.randn(1, args.heads, context, 64, generator=g)
        # each round's ring: chunk slots spread over the context, the newest key (the last slot) among them
        slots = torch.randint(0, context, (1, args.heads, args.rounds, args.chunk), generator=g)
        slots[..., 0] = context - 1
        q = torch.randn(1, args.heads, 1, 64, generator=g)
        lsh = timed(partial(lsh_decode_attention, q, keys, values, slots, context - 1), args.repeats)
        exact = timed(partial(decode_attention_torch, q, keys, values, context), args.repeats)
        rows.append({"context": context, "lsh_ms": 1000 * lsh, "exact_ms": 1000 * exact,
                     "exact_over_lsh": exact / lsh})
    print(f"threads {args.threads}; {args.heads} heads of 64; {args.rounds} rounds, chunk {args.chunk}")
    print("| context | LSH step ms | exact step ms | exact / LSH |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['context']:,} | {r['lsh_ms']:.3f} | {r['exact_ms']:.3f} | "
              f"{r['exact_over_lsh']:.2f} |")
    print(json.dumps({"settings": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
