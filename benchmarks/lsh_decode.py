"""LSH attention's decode step against exact decode attention over the same cache, by context length.

The LSH step reads each cached key's buckets (n_rounds numbers) and then at most n_rounds * chunk keys and values;
exact decode reads every key and value. Both are the torch forms (``ops.lsh_decode_attention`` and
``decode_attention_torch``, SDPA), one new query per step, heads of 64. Prints a table and JSON.

    python benchmarks/lsh_decode.py [--threads 2] [--contexts 1024,8192,65536]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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
        n_buckets = max(2, 2 * (context // args.chunk // 2))
        keys = F.normalize(torch.randn(1, args.heads, context, 64, generator=g), dim=-1)
        values = torch.randn(1, args.heads, context, 64, generator=g)
        hashes = torch.randint(1, n_buckets + 1, (1, args.heads, context, args.rounds), generator=g).float()
        q = torch.randn(1, args.heads, 1, 64, generator=g)
        lsh = timed(lambda: lsh_decode_attention(q, keys, values, hashes, context, args.chunk), args.repeats)
        exact = timed(lambda: decode_attention_torch(q, keys, values, context), args.repeats)
        rows.append({"context": context, "n_buckets": n_buckets, "lsh_ms": 1000 * lsh, "exact_ms": 1000 * exact,
                     "exact_over_lsh": exact / lsh})
    print(f"threads {args.threads}; {args.heads} heads of 64; {args.rounds} rounds, chunk {args.chunk}")
    print("| context | buckets | LSH step ms | exact step ms | exact / LSH |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['context']:,} | {r['n_buckets']} | {r['lsh_ms']:.3f} | {r['exact_ms']:.3f} | "
              f"{r['exact_over_lsh']:.2f} |")
    print(json.dumps({"settings": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
