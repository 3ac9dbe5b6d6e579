"""What the audit log's fsync policy costs: microseconds per record written, and requests per second through the
server for the cheapest requests there are (refused with a 401: all audit, no model), per policy.

    python benchmarks/audit_fsync.py --records 2000 --requests 400

Policies: ``0`` (fsync every record), ``1.0`` (the default: at most one fsync a second), ``never`` (the kernel's
choice). The figures depend on the disk; the log's directory is a temporary one beside ``--dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.serve import AuditLog, AuthConfig, create_app
from hybridlm.serve.app import BackgroundServer

POLICIES: tuple[float | str, ...] = (0, 1.0, "never")
RECORD = {"time": "2026-12-04T12:00:00.000Z", "request_id": "req_0", "method": "POST", "path": "/v1/completions",
          "endpoint": "completions", "principal": "alice", "role": "user", "auth": "api_key", "client": "127.0.0.1",
          "model": "m", "prompt": "hello " * 30, "output": "o" * 200, "prompt_tokens": 181, "completion_tokens": 200,
          "finish_reason": "length", "error": None, "status": 200, "latency_ms": 12.5}


def us_per_record(directory: Path, policy: float | str, n: int) -> float:
    runs = []
    for r in range(3):
        log = AuditLog.from_config({"fsync_seconds": policy}, directory / f"us-{policy}-{r}.jsonl")
        start = time.perf_counter()
        for _ in range(n):
            log.write(RECORD)
        runs.append((time.perf_counter() - start) / n * 1e6)
        log.close()
    return statistics.median(runs)


async def refused_per_second(url: str, n: int, concurrency: int = 8) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                r = await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
                assert r.status_code == 401

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--dir", default=".", help="where the temporary logs go (the disk measured)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("llama-tiny")).eval()
    auth = AuthConfig(roles={}, keys={})
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        print(f"{'fsync_seconds':>14} {'us/record':>10} {'401 req/s':>10}")
        for policy in POLICIES:
            us = us_per_record(directory, policy, args.records)
            log = AuditLog.from_config({"fsync_seconds": policy}, directory / f"server-{policy}.jsonl")
            app = create_app({"m": model}, auth=auth, audit_log=log, allowed_hosts=["127.0.0.1"])
            with BackgroundServer(app) as server:
                asyncio.run(refused_per_second(server.url, 50))  # warm-up
                rps = statistics.median(asyncio.run(refused_per_second(server.url, args.requests)) for _ in range(3))
            print(f"{policy!s:>14} {us:>10.1f} {rps:>10.0f}")


if __name__ == "__main__":
    main()
