"""One peer's measurements in a process of its own, on the same weights.

A peer in the bench's process would share its OpenMP runtimes, thread settings and allocator with ours (and did:
hybridlm then set ``OMP_WAIT_POLICY=PASSIVE``, which slowed llama.cpp's decode 1.8x). Here it runs in a child
process that inherits this one's environment (``peer_child``). The parent sends a JSON job on stdin; the result goes
to the job's ``out`` file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hybridlm.bench.settings import BenchSettings


def weights_fingerprint(model: Any) -> list[float]:
    """Per-parameter sums in float64: the child checks that it rebuilt the very same random weights."""
    return [float(p.detach().double().sum()) for p in model.parameters()]


def measure_peer(peer: str, preset: str, fingerprint: list[float], settings: BenchSettings, max_context: int
                 ) -> tuple[dict[str, Any] | None, str | None]:
    """(the peer's figures, None) or (None, why it was not measured), from a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        job = {"peer": peer, "preset": preset, "fingerprint": fingerprint, "max_context": max_context,
               "settings": settings.to_dict(), "out": str(out)}
        # The budget bounds how many points start, not how long one takes: Hugging Face's Mamba fallback
        # spends minutes on one forward+backward. Only a hung peer meets this limit.
        timeout = 3600 + 10 * settings.budget_s
        try:
            proc = subprocess.run([sys.executable, "-m", "hybridlm.bench.peer_child"], input=json.dumps(job),
                                  text=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"failed: the peer process ran past {timeout:.0f} s"
        if not out.exists():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            return None, f"failed: peer process exited with code {proc.returncode}: {' | '.join(tail)}"[:300]
        reply = json.loads(out.read_text())
    if "not_measured" in reply:
        return None, reply["not_measured"]
    result = reply["result"]
    for kind in ("prefill", "decode"):  # JSON made the lengths strings
        result[kind] = {int(k): v for k, v in result[kind].items()}
    return result, None
