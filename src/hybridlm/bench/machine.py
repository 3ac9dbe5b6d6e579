"""The machine's physical limits, measured by the bench itself: streaming read bandwidth, matmul rate, exp rate.

They frame the measurements: decode cannot beat (bytes read per token) / (read bandwidth), prefill cannot beat
FLOPs / (matmul rate) plus the scan's exps / (exp rate).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from numba import njit, prange

from hybridlm.ops.fast_math import vexp_array
from hybridlm.ops.gemm import onednn


@njit(cache=True, parallel=True, fastmath=True)
def _stream_sum(a):  # pragma: no cover - compiled
    # a: (n,) float32 -> sum; a sequential read of every byte, split over the threads
    total = np.float32(0.0)
    for i in prange(a.size):
        total += a[i]
    return total


def _best(fn, repeats: int) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Machine:
    cpu: str
    threads: int
    read_gbps: float  # streaming read bandwidth, GB/s (numba prange sum over 512 MiB)
    gemm_gflops: float  # float32 matmul rate, 2048 x 768 @ 768 x 3072: the faster of torch.mm and oneDNN's GEMM
    exp_gps: float  # vectorised exp rate, G/s (the faster of torch.exp and fast_math.vexp, in cache)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def median(cls, machines: list[Machine]) -> Machine:
        """Each rate the median over several measurements of the same machine."""
        rates = {k: statistics.median(getattr(m, k) for m in machines) for k in ("read_gbps", "gemm_gflops", "exp_gps")}
        return cls(cpu=machines[0].cpu, threads=machines[0].threads, **rates)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_machine(threads: int, repeats: int = 5) -> Machine:
    """Measure this machine's limits at ``threads`` threads (torch and numba both set to it)."""
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    big = np.ones(128 * 2**20, dtype=np.float32)  # 512 MiB: far beyond any cache
    read = big.nbytes / _best(lambda: _stream_sum(big), repeats) / 1e9
    a, b = torch.randn(2048, 768), torch.randn(768, 3072)
    b_rows = b.t().contiguous()  # (out, in), as a linear layer holds it
    gemm = 2 * 2048 * 768 * 3072 / min(_best(fn, repeats) for fn in (
        lambda: torch.mm(a, b), lambda: onednn.linear(a, b_rows))) / 1e9
    x = torch.rand(1 << 16) * -10
    out = torch.empty_like(x)
    inner = 50  # repeat in cache so the rate is the exp's, not memory's

    def torch_exp():
        for _ in range(inner):
            torch.exp(x, out=out)

    def numba_exp():
        for _ in range(inner):
            vexp_array(x.numpy())

    rate = max(x.numel() * inner / _best(fn, repeats) for fn in (torch_exp, numba_exp)) / 1e9
    return Machine(cpu=f"{_cpu_name()} ({os.cpu_count()} logical CPUs)", threads=threads, read_gbps=read,
                   gemm_gflops=gemm, exp_gps=rate)


def median_time(fn, repeats: int, budget_s: float) -> float:
    """Median seconds of ``fn()`` after one warm-up call (JIT compilation, first allocations), over up to
    ``repeats`` runs within ``budget_s`` (at least one)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        times.append(_timed(fn))
    return statistics.median(times)
