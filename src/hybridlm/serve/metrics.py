"""Prometheus text exposition (format 0.0.4) of the server's counters and each model's scheduler gauges.

A composition of experts adds ``hybridlm_expert_requests_total{model, expert, fell_back}`` (requests routed to
and admitted by each expert), and its experts' scheduler gauges carry ``model`` (the composition's name) and
``expert`` labels.
"""

from __future__ import annotations

import threading
from collections import Counter

from hybridlm.serve.scheduler import Scheduler


class Metrics:
    """Request counters by endpoint and status, and by a composition's answering expert; the rest is read from
    the schedulers when scraped."""

    def __init__(self) -> None:
        self._requests: Counter[tuple[str, int]] = Counter()
        self._experts: Counter[tuple[str, str, bool]] = Counter()
        self._lock = threading.Lock()

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1

    def count_expert(self, model: str, expert: str, fell_back: bool) -> None:
        """One request of composition ``model`` admitted by ``expert`` (the fallback when ``fell_back``)."""
        with self._lock:
            self._experts[(model, expert, fell_back)] += 1

    def expert_requests(self, model: str, expert: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, e, _), n in self._experts.items() if m == model and expert in (None, e))

    def requests(self, endpoint: str | None = None, status: int | None = None) -> int:
        with self._lock:
            return sum(n for (e, s), n in self._requests.items()
                       if (endpoint is None or e == endpoint) and (status is None or s == status))

    def render(self, schedulers: dict[str, Scheduler],
               expert_schedulers: dict[str, dict[str, Scheduler]] | None = None) -> str:
        """The exposition text: ``schedulers`` by model name, ``expert_schedulers`` by composition, then expert."""
        lines = ["# HELP hybridlm_requests_total HTTP requests by endpoint and status.",
                 "# TYPE hybridlm_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self._requests.items()):
                lines.append(f'hybridlm_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            experts = sorted(self._experts.items())
        if expert_schedulers:
            lines += ["# HELP hybridlm_expert_requests_total A composition's requests admitted by each expert "
                      "(fell_back: below the router's threshold).",
                      "# TYPE hybridlm_expert_requests_total counter"]
            lines += [f'hybridlm_expert_requests_total{{model="{m}",expert="{e}",fell_back="{str(f).lower()}"}} {n}'
                      for (m, e, f), n in experts]
        # label sets: {model="m"} for a model, {model="coe",expert="e"} for an expert of a composition
        labelled = [(f'model="{name}"', s) for name, s in schedulers.items()]
        labelled += [(f'model="{name}",expert="{e}"', s) for name, d in (expert_schedulers or {}).items()
                     for e, s in d.items()]
        gauges = [
            ("generated_tokens_total", "counter", "Tokens generated.", lambda s: s.generated_tokens),
            ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", lambda s: s.prompt_tokens),
            ("forward_calls_total", "counter", "Model forward calls (prefills and batched decode steps).",
             lambda s: s.forward_calls),
            ("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
             lambda s: round(s.tokens_per_second(), 3)),
            ("queue_depth", "gauge", "Requests waiting to join the batch.", lambda s: s.queue_depth),
            ("active_streams", "gauge", "Requests being decoded.", lambda s: s.active_streams),
            ("state_bytes", "gauge", "Bytes of KV cache / SSM state held by the running batch.",
             lambda s: s.state_bytes),
            ("state_bytes_per_stream", "gauge", "state_bytes / active_streams (0 when idle).",
             lambda s: s.state_bytes // s.active_streams if s.active_streams else 0),
        ]
        for name, kind, help_, read in gauges:
            lines += [f"# HELP hybridlm_{name} {help_}", f"# TYPE hybridlm_{name} {kind}"]
            lines += [f"hybridlm_{name}{{{labels}}} {read(s)}" for labels, s in labelled]
        return "\n".join(lines) + "\n"
