"""The measurement plan: for each preset, ours and then each peer right after it, same threads.

Prefill tokens/s at lengths 256, 512, ... (doubling), decode ms/token at contexts 512 ... 64K, forward+backward
tokens/s at 512 tokens, and memory (state bytes, peak RSS) against context. Each figure is the median of up to
``repeats`` runs after a warm-up; a point whose predicted time does not fit in what is left of the subject's
time budget is skipped (and reported as skipped, never as a figure). Ours runs in this process; each peer in a
child process of its own with the same environment (``peer_process``), on the same weights. With ``rounds`` > 1
the sequence ours, peer, peer ... runs that many times per preset and each figure is the median over the rounds:
on a shared machine whose speed drifts by up to 1.5x over minutes, alternating the subjects keeps one slow
moment from landing on one side of a ratio only. The machine's limits are measured again before each round
(they drift as much), and a preset's bounds use the median of its rounds' measurements.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any

import torch

from hybridlm.bench.machine import Machine, measure_machine, median_time
from hybridlm.bench.peer_process import measure_peer, weights_fingerprint
from hybridlm.bench.settings import DEFAULT_PRESETS, BenchSettings
from hybridlm.bench.subjects import Ours, build_model, state_at_context
from hybridlm.model import HybridLM


def set_threads(threads: int) -> None:
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


# ----------------------------------------------------------------------------------------- peak RSS
def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------- physical limits
def decode_bytes(model: HybridLM, state_bytes: int) -> int:
    """Bytes a decode step must read: every weight used per token (active experts only; the tied embedding
    once, as the LM head reads all of it) plus the state (KV cache / SSM state)."""
    param_bytes = model.num_parameters(active=True) * next(model.parameters()).element_size()
    return param_bytes + state_bytes


def prefill_work(model: HybridLM, length: int) -> tuple[float, float]:
    """(FLOPs, exps) per token of a prefill of ``length`` tokens: 2 per active matmul weight (the LM head only
    for the last token), plus each mixer's own (``prefill_work``: attention's scores, the scans' exps)."""
    c = model.config
    head = c.padded_vocab_size * c.d_model
    flops = 2.0 * (model.num_parameters(active=True) - head) + 2.0 * head / length
    exps = 0.0
    for block in model.layers:  # each mixer's own work beyond its projections
        mixer_flops, mixer_exps = block.mixer.prefill_work(length)
        flops += mixer_flops
        exps += mixer_exps
    return flops, exps


# ----------------------------------------------------------------------------------------- measuring
class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _fits(last: float | None, growth: float, runs: int, budget: Budget) -> bool:
    return last is None or last * growth * (runs + 1) < budget.left()


def measure_subject(subject: Any, model: HybridLM, settings: BenchSettings, is_ours: bool) -> dict[str, Any]:
    """Prefill / decode / train figures of one subject (ours or a peer) for one model."""
    budget = Budget(settings.budget_s)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {"prefill": {}, "decode": {}, "train": None, "skipped": []}
    last, prev = None, None
    for length in settings.prefill_lengths:
        growth = max(2.0, (last / prev) if last and prev else 2.0)
        if not _fits(last, growth, settings.repeats, budget):
            out["skipped"].append(f"prefill {length}")
            continue
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        reset_peak_rss()
        seconds = median_time(lambda ids=ids: subject.prefill(ids), settings.repeats, budget.left() / 4)
        entry = {"tok_s": length / seconds, "seconds": seconds}
        if is_ours:
            entry["peak_rss"] = peak_rss_bytes()
        out["prefill"][length] = entry
        prev, last = last, seconds
    for context in settings.decode_contexts:
        rates = [v["tok_s"] for v in out["prefill"].values()]
        # Peers reach a context by prefilling it for real: skip contexts whose prefill would not fit the budget.
        prefill_s = 0.0 if is_ours else context / (min(rates) if rates else 1.0)
        if budget.left() < 5 or prefill_s > budget.left() / 2:
            out["skipped"].append(f"decode {context}")
            continue
        try:
            reset_peak_rss()
            step = subject.decoder(context)
        except Exception as e:  # a peer that cannot hold this context (e.g. out of memory): report it
            out["skipped"].append(f"decode {context}: {type(e).__name__}: {e}"[:200])
            continue
        n = settings.decode_tokens

        def steps(step=step, n=n) -> None:
            for _ in range(n):
                step()

        seconds = median_time(steps, settings.repeats, budget.left() / 4)
        entry = {"ms_token": seconds / n * 1e3}
        if is_ours:
            entry["peak_rss"] = peak_rss_bytes()
        out["decode"][context] = entry
        del step
    if settings.train_length and getattr(subject, "train_step", None) is not None and budget.left() > 5:
        ids = torch.randint(0, vocab, (1, settings.train_length), generator=gen)
        seconds = median_time(lambda: subject.train_step(ids), settings.repeats, budget.left() / 2)
        out["train"] = {"length": settings.train_length, "tok_s": settings.train_length / seconds}
    return out


def median_of_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One subject's figures from several rounds of ``measure_subject``: each number the median over the rounds
    that measured it (peak RSS: the largest); a point is skipped only when every round skipped it."""
    def merge(entries: list[dict[str, Any]]) -> dict[str, Any]:
        merged = {}
        for key in entries[0]:
            values = [e[key] for e in entries if e.get(key) is not None]
            if not values:
                merged[key] = None
            else:
                merged[key] = max(values) if key == "peak_rss" else statistics.median(values)
        return merged

    out: dict[str, Any] = {"rounds": len(rounds)}
    for kind in ("prefill", "decode"):
        points = sorted({point for r in rounds for point in r[kind]})
        out[kind] = {point: merge([r[kind][point] for r in rounds if point in r[kind]]) for point in points}
    trains = [r["train"] for r in rounds if r["train"]]
    out["train"] = {**merge(trains), "length": trains[0]["length"]} if trains else None
    measured = {f"{kind} {point}" for kind in ("prefill", "decode") for point in out[kind]}
    skipped = dict.fromkeys(s for r in rounds for s in r["skipped"])  # e.g. "decode 8192: MemoryError ..."
    out["skipped"] = [s for s in skipped if s.split(":")[0] not in measured]
    return out


def limits(model: HybridLM, machine: Machine, settings: BenchSettings) -> dict[str, Any]:
    """The physical bounds beside each measurement: prefill tok/s ceiling, decode ms/token floor, state bytes."""
    res: dict[str, Any] = {"prefill": {}, "decode": {}}
    for length in settings.prefill_lengths:
        flops, exps = prefill_work(model, length)
        seconds = flops / (machine.gemm_gflops * 1e9) + exps / (machine.exp_gps * 1e9)
        res["prefill"][length] = {"flops_token": flops, "exps_token": exps, "bound_tok_s": 1 / seconds}
    for context in settings.decode_contexts:
        state = model.init_state(1, max_len=0, device="meta")
        state_bytes = sum(layer.nbytes_at(context) for layer in state.layers)
        nbytes = decode_bytes(model, state_bytes)
        res["decode"][context] = {"state_bytes": state_bytes, "bytes_token": nbytes,
                                  "bound_ms": nbytes / (machine.read_gbps * 1e9) * 1e3}
    return res


def scan_benchmark(machine: Machine, repeats: int) -> dict[str, Any]:
    """The isolated selective scan (batch 1, L 2048, d_inner 1536, d_state 16) against its exp bound."""
    from hybridlm.ops.scan.numba_ops import selective_scan_numba

    b, length, d, n = 1, 2048, 1536, 16
    gen = torch.Generator().manual_seed(0)
    x, dt, z = (torch.randn(b, length, d, generator=gen) for _ in range(3))
    A = -torch.rand(d, n, generator=gen) * 4
    B, C = torch.randn(b, length, n, generator=gen), torch.randn(b, length, n, generator=gen)
    D, bias = torch.ones(d), torch.randn(d, generator=gen) - 4
    with torch.no_grad():
        seconds = median_time(lambda: selective_scan_numba(x, dt, A, B, C, D, z, bias, True), repeats, 30)
    bound = b * length * d * n / (machine.exp_gps * 1e9)
    return {"shape": [b, length, d, n], "ms": seconds * 1e3, "exp_bound_ms": bound * 1e3,
            "ratio_to_bound": seconds / bound}


def linear_attention_forms(model: HybridLM, lengths: tuple[int, ...], repeats: int, budget_s: float
                           ) -> dict[str, Any] | None:
    """One linear-attention layer of ``model`` (its first) over a prompt of each length, batch 1, as its chunked form
    and as the quadratic form (q kᵀ ⊙ D) v a Transformer's attention has: ms each and their ratio. None where the model
    has no such layer or its decay is per key feature (the quadratic form would need an (l, l, features) tensor)."""
    from hybridlm.layers.linear_attention import LinearAttention
    from hybridlm.ops import dispatch

    mixers = [b.mixer for b in model.layers if isinstance(b.mixer, LinearAttention)]
    if not mixers or mixers[0].options.decay == "gla":
        return None
    mixer, out = mixers[0], {}
    gen = torch.Generator().manual_seed(0)
    spent = time.perf_counter()
    saved = os.environ.get(dispatch.ENV_VAR)
    try:
        for length in sorted(lengths):
            x = torch.randn(1, length, model.config.d_model, generator=gen)
            row = {}
            for form in ("chunked", "quadratic"):
                left = budget_s - (time.perf_counter() - spent)
                if left <= 0:
                    break
                os.environ[dispatch.ENV_VAR] = f"linear_attention={form}"  # the dispatch's own way to force a form
                with torch.no_grad():
                    row[f"{form}_ms"] = 1e3 * median_time(lambda x=x: mixer(x), repeats, left)
            if len(row) == 2:
                row["quadratic_over_chunked"] = row["quadratic_ms"] / row["chunked_ms"]
            out[length] = row
    finally:
        if saved is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = saved
    return out


def run(settings: BenchSettings, log=print) -> dict[str, Any]:
    """Measure everything in ``settings``; returns a JSON-able dict (see ``report.format_report``). torch and
    numba run at ``settings.threads`` threads meanwhile; their previous counts are restored afterwards, so a
    caller in the same process (a test suite, a notebook) is not left at the bench's thread count."""
    import numba

    saved = torch.get_num_threads(), numba.get_num_threads()
    try:
        return _run(settings, log)
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


def _run(settings: BenchSettings, log) -> dict[str, Any]:
    set_threads(settings.threads)
    log(f"measuring machine limits at {settings.threads} threads ...")
    machine = measure_machine(settings.threads)
    results: dict[str, Any] = {"machine": machine.to_dict(), "settings": settings.to_dict(), "presets": {},
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}
    if settings.peers and results["omp_wait_policy"].upper() == "ACTIVE":
        log("warning: OMP_WAIT_POLICY=ACTIVE: this process's idle OpenMP threads keep spinning while a peer's "
            "process runs, taking cores from it; the peers' figures are not comparable")
    if settings.scan:
        results["scan"] = scan_benchmark(machine, settings.repeats)
    max_context = max([*settings.prefill_lengths, *settings.decode_contexts]) + 256
    # Per preset, ours and then each peer right after it (in turn, ``rounds`` times): a ratio compares runs
    # minutes apart at most, so a change in the machine's load between them (a shared machine) moves both sides
    # alike. This process idles while a peer's process measures.
    for preset in settings.presets:
        model = build_model(preset)
        entry: dict[str, Any] = {"subjects": {}, "not_measured": {}}
        results["presets"][preset] = entry
        fingerprint = weights_fingerprint(model)
        rounds: dict[str, list[dict[str, Any]]] = {}
        machines: list[Machine] = []
        for r in range(settings.rounds):
            suffix = f" (round {r + 1}/{settings.rounds})" if settings.rounds > 1 else ""
            machines.append(measure_machine(settings.threads))
            log(f"{preset}: hybridlm ...{suffix}")
            rounds.setdefault("hybridlm", []).append(measure_subject(Ours(model), model, settings, is_ours=True))
            for peer in settings.peers:
                if peer in entry["not_measured"]:
                    continue
                log(f"{preset}: {peer} ...{suffix}")
                figures, why_not = measure_peer(peer, preset, fingerprint, settings, max_context)
                if figures is None:  # not installed, cannot run this family, or failed: reported, never a pass
                    entry["not_measured"][peer] = why_not
                    rounds.pop(peer, None)
                    log(f"{preset}: {peer} not measured ({why_not})")
                else:
                    rounds.setdefault(peer, []).append(figures)
        for name, measured in rounds.items():
            entry["subjects"][name] = measured[0] if len(measured) == 1 else median_of_rounds(measured)
        machine_now = Machine.median(machines)
        entry["machine"] = machine_now.to_dict()
        entry["limits"] = limits(model, machine_now, settings)
        forms = linear_attention_forms(model, settings.prefill_lengths, settings.repeats, settings.budget_s)
        if forms is not None:
            log(f"{preset}: linear attention, chunked vs quadratic ...")
            entry["linear_attention_forms"] = forms
        del model
        gc.collect()
    return results


__all__ = ["DEFAULT_PRESETS", "BenchSettings", "run", "state_at_context"]
