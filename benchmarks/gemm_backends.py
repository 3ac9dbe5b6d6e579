"""float32 linear products on the CPU: torch's default BLAS (``F.linear``, MKL) against oneDNN's GEMM
(``hybridlm.ops.gemm.onednn.linear``), timed in interleaved pairs in one process.

    python benchmarks/gemm_backends.py --threads 2 --pairs 20

The shapes are a 130M model's prefill and training products (rows = tokens): Mamba-2's in_proj and out_proj, the
Llama feed-forward, Mamba-1's in_proj, and a few decode-batch row counts. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hybridlm.ops.gemm import onednn

SHAPES = [  # (rows, in_features, out_features)
    (1024, 768, 3352), (1024, 1536, 768), (1024, 768, 3072), (1024, 768, 2048), (1024, 2048, 768),
    (4096, 768, 3352), (128, 768, 3352), (32, 768, 3352), (8, 768, 3352),
]


def _pair_medians(first, second, pairs: int) -> tuple[float, float]:
    first(), second()  # warm-up
    a, b = [], []
    for i in range(pairs):  # alternate which runs first, so neither always meets the other's cache state
        for fn, times in ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=20)
    args = parser.parse_args()
    if not onednn.AVAILABLE:
        raise SystemExit("oneDNN's linear is not available here (not x86, or torch built without mkldnn)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{'rows x in -> out':>22} {'torch GFLOP/s':>14} {'oneDNN GFLOP/s':>15} {'oneDNN time / torch':>20}")
    with torch.no_grad():
        for m, k, n in SHAPES:
            x, w = torch.randn(m, k), torch.randn(n, k) * k**-0.5
            t_torch, t_onednn = _pair_medians(lambda x=x, w=w: F.linear(x, w),
                                              lambda x=x, w=w: onednn.linear(x, w), args.pairs)
            flops = 2 * m * k * n
            row = dict(rows=m, in_features=k, out_features=n, torch_gflops=flops / t_torch / 1e9,
                       onednn_gflops=flops / t_onednn / 1e9, time_ratio=t_onednn / t_torch)
            rows.append(row)
            print(f"{f'{m} x {k} -> {n}':>22} {row['torch_gflops']:14.0f} {row['onednn_gflops']:15.0f} "
                  f"{row['time_ratio']:20.3f}")
    print(json.dumps(dict(threads=args.threads, pairs=args.pairs, torch=torch.__version__, results=rows)))


if __name__ == "__main__":
    main()
