"""Check that a refactor changed no behaviour: the same models, run by two versions of the source tree.

    python benchmarks/compare_commits.py OLD_SRC NEW_SRC [--check logits] [--check bench] [--json OUT.json]

OLD_SRC and NEW_SRC are the ``src`` directories of two hybridlm checkouts, e.g. after
``git worktree add /tmp/old <commit>``: ``/tmp/old/src``. Each version runs in subprocesses of its own with
``PYTHONPATH`` set to its ``src`` (this script re-invoked as a hidden worker); both get the same thread count
(``--threads``, default 2: torch, OpenMP, MKL and numba).

``--check logits``: for each preset (``--presets``), seed 0, the model in eval mode without gradients:
  * batch 1: the full-sequence logits of a 32-token random prompt without a state; its prefill into a fresh
    state (the last position's logits); then 64 greedy decode steps, one token at a time (every step's logits
    and the tokens fed);
  * batch 3: prompts of 32, 20 and 9 tokens left-padded to 32 with an attention mask, prefilled into a fresh
    state, then 64 greedy decode steps without a mask (argmax per row).
Each version chooses its own decoded tokens. All tensors go to one safetensors file per version; the report
says per preset whether every tensor is bitwise equal and, if not, the largest absolute difference and the first
tensor (and decode step) that differs. The exit code is 1 when any preset differs or fails to run in either
version (2 when a worker process itself fails).

``--check bench``: prefill and decode time of the 130M presets (``--bench-presets``), float32. Both versions run in
one process (each tree's package copied under its own name, ``hybridlm_old`` and ``hybridlm_new``), on the same
weights, their calls alternated old-new, new-old: a 1024-token prefill into a fresh state a call, and a decode step a
token after a 512-token prefill. The ratio is the median of the pairs' ratios (quartiles beside it), flagged when
above ``--slower-than`` (1.03). On a machine whose speed drifts over minutes this reads ratios that one process per
version cannot. An A/B of a tree against itself still read 1.21x and 1.23x for llama-130m and jamba-130m decode in
one run here (docs/performance.md), so run a control (a tree against itself) beside a flagged ratio. Timings do
not change the exit code.

Without ``--check`` both checks run.

Numba's cache: a kernel compiled in-process can round differently from the same kernel loaded from numba's cache
(the decode attention kernel does, by an ulp). A logits worker that had to compile kernels (a fresh checkout, a
changed kernel) is therefore run again, so that both versions' results come from cached kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOGIT_PRESETS = ["mamba-tiny", "mamba2-tiny", "llama-tiny", "jamba-tiny",
                 "mamba-130m", "mamba2-130m", "llama-130m", "jamba-130m"]
BENCH_PRESETS = ["mamba-130m", "mamba2-130m", "llama-130m", "jamba-130m"]

PROMPT_LENGTH = 32
PADDED_LENGTHS = (32, 20, 9)
DECODE_STEPS = 64
PROMPT_SEED = 1234
PAD_ID = 0

BENCH_PREFILL = 1024
BENCH_DECODE_CONTEXT = 512
BENCH_DECODE_WARMUP = 16

WORKER = "_worker"  # the hidden subcommand a version's subprocess runs


# ============================================================================ worker (runs under one src)
def _set_threads(threads: int) -> None:
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _check_import(src: str) -> None:
    """Fail unless ``hybridlm`` is imported from ``src`` (and not, say, from an editable install elsewhere)."""
    import hybridlm

    where = Path(hybridlm.__file__).resolve()
    if not where.is_relative_to(Path(src).resolve()):
        raise SystemExit(f"error: hybridlm was imported from {where}, not from {src}")


def _numba_compiles() -> int | None:
    """How many times this process compiled one of hybridlm's cached numba kernels instead of loading it from
    numba's cache (None: unknown). It matters: a kernel compiled in-process can round differently from the same
    kernel loaded from the cache (seen with the decode attention kernel: 1-ulp differences after 64 tokens)."""
    try:
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher

        kernels = {id(v): v for name, module in list(sys.modules.items())
                   if name == "hybridlm" or name.startswith("hybridlm.")
                   for v in list(vars(module).values())
                   if isinstance(v, Dispatcher) and not isinstance(v._cache, NullCache)}
        return sum(sum(k.stats.cache_misses.values()) for k in kernels.values())
    except Exception:  # numba internals moved: no count
        return None


def _build(preset: str):
    import torch

    from hybridlm import HybridLM, ModelConfig

    torch.manual_seed(0)
    return HybridLM(ModelConfig.preset(preset)).eval()  # float32, the default dtype


def _greedy(logits, vocab: int):
    # logits: (b, 1, padded_vocab) -> the next tokens (b, 1), among the real (unpadded) vocabulary
    return logits[:, -1, :vocab].argmax(-1, keepdim=True)


def _decode(model, state, logits, steps: int) -> tuple[Any, Any]:
    """``steps`` greedy steps from the prefill's last logits: (steps, b, padded_vocab) logits, (steps, b) tokens."""
    import torch

    vocab = model.config.vocab_size
    all_logits, tokens = [], []
    for _ in range(steps):
        token = _greedy(logits, vocab)
        tokens.append(token[:, 0])
        logits = model(token, state=state).logits[:, -1:]
        all_logits.append(logits[:, 0])
    return torch.stack(all_logits), torch.stack(tokens)


def _logit_tensors(preset: str) -> dict[str, Any]:
    """Every tensor the logits check compares for one preset, keys in the order they are compared."""
    import torch

    model = _build(preset)
    vocab = model.config.vocab_size
    out: dict[str, Any] = {}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(PROMPT_SEED)
        ids = torch.randint(0, vocab, (1, PROMPT_LENGTH), generator=gen)
        out["b1/prompt"] = ids
        out["b1/forward_logits"] = model(ids).logits
        state = model.init_state(1)
        prefill = model(ids, state=state).logits[:, -1:]
        out["b1/prefill_logits"] = prefill[:, 0]
        out["b1/decode_logits"], out["b1/tokens"] = _decode(model, state, prefill, DECODE_STEPS)

        width = max(PADDED_LENGTHS)
        ids = torch.randint(0, vocab, (len(PADDED_LENGTHS), width), generator=gen)
        mask = torch.ones_like(ids)
        for row, length in enumerate(PADDED_LENGTHS):
            ids[row, : width - length] = PAD_ID
            mask[row, : width - length] = 0
        out["b3/prompt"], out["b3/attention_mask"] = ids, mask
        state = model.init_state(len(PADDED_LENGTHS))
        prefill = model(ids, state=state, attention_mask=mask).logits[:, -1:]
        out["b3/prefill_logits"] = prefill[:, 0]
        out["b3/decode_logits"], out["b3/tokens"] = _decode(model, state, prefill, DECODE_STEPS)
    return {f"{preset}/{k}": v.detach().contiguous() for k, v in out.items()}


def worker_logits(presets: list[str], out: Path) -> None:
    """All presets' tensors to ``out`` (safetensors); the key order and any per-preset error in its metadata."""
    import traceback

    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for preset in presets:
        start = time.perf_counter()
        try:
            tensors.update(_logit_tensors(preset))
        except Exception as e:  # a version that fails on one preset is reported, the others still compared
            traceback.print_exc()
            errors[preset] = f"{type(e).__name__}: {e}"
        print(f"  [{preset}] {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    save_file(tensors, str(out), metadata={"order": json.dumps(list(tensors)), "errors": json.dumps(errors),
                                           "numba_compiles": json.dumps(_numba_compiles())})


def _install_copy(src: Path, name: str, into: Path) -> None:
    """``src``'s hybridlm package copied to ``into/name``, its imports of itself renamed: two versions then load side
    by side in one process."""
    dst = into / name
    shutil.copytree(src / "hybridlm", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for file in dst.rglob("*.py"):
        text = file.read_text()
        text = re.sub(r"(?<![\w\"'./])hybridlm(?=\.[a-z_]|\s+import\b)", name, text)
        file.write_text(re.sub(r"^import hybridlm$", f"import {name}", text, flags=re.M))


def worker_bench(old_src: Path, new_src: Path, presets: list[str], pairs: int, out: Path) -> None:
    """Both versions in this one process, the same weights, their calls alternated old-new / new-old: a prefill a
    call, and a decode step a token. Each time's ratio is taken against its pair's."""
    import importlib

    import torch

    packages = Path(tempfile.mkdtemp(prefix="compare_commits-pkgs-"))
    _install_copy(old_src, "hybridlm_old", packages)
    _install_copy(new_src, "hybridlm_new", packages)
    sys.path.insert(0, str(packages))
    versions = {v: importlib.import_module(f"hybridlm_{v}") for v in ("old", "new")}
    results = []
    for preset in presets:
        models = {}
        for v, package in versions.items():
            torch.manual_seed(0)
            models[v] = package.HybridLM(package.ModelConfig.preset(preset)).eval()
        vocab = models["old"].config.vocab_size
        gen = torch.Generator().manual_seed(PROMPT_SEED)
        prompt = torch.randint(0, vocab, (1, BENCH_PREFILL), generator=gen)
        context = torch.randint(0, vocab, (1, BENCH_DECODE_CONTEXT), generator=gen)
        times: dict[str, dict[str, list[float]]] = {m: {"old": [], "new": []} for m in ("prefill", "decode")}
        with torch.no_grad():
            for model in models.values():  # warm-up: compiles or loads the kernels
                model(prompt, state=model.init_state(1), logits_to_keep=1)
            for i in range(max(4, pairs // 20)):
                for v in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    start = time.perf_counter()
                    models[v](prompt, state=models[v].init_state(1), logits_to_keep=1)
                    times["prefill"][v].append(time.perf_counter() - start)
            states = {v: m.init_state(1) for v, m in models.items()}
            tokens = {v: _greedy(m(context, state=states[v], logits_to_keep=1).logits, vocab)
                      for v, m in models.items()}
            for i in range(BENCH_DECODE_WARMUP + pairs):
                for v in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    start = time.perf_counter()
                    logits = models[v](tokens[v], state=states[v], logits_to_keep=1).logits
                    elapsed = time.perf_counter() - start
                    tokens[v] = _greedy(logits, vocab)
                    if i >= BENCH_DECODE_WARMUP:
                        times["decode"][v].append(elapsed)
        results.append({"preset": preset, "times": times})
        print(f"[bench] {preset} measured", file=sys.stderr, flush=True)
        del models, states
    shutil.rmtree(packages, ignore_errors=True)
    out.write_text(json.dumps({"results": results, "loadavg_1min": os.getloadavg()[0]}))


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog=f"compare_commits.py {WORKER}")
    p.add_argument("kind", choices=["logits", "bench"])
    p.add_argument("--src", required=True, help="logits: the version's src; bench: OLD_SRC,NEW_SRC")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--presets", required=True, help="comma-separated (bench: one)")
    p.add_argument("--out", type=Path, help="the logits worker's output file")
    p.add_argument("--pairs", type=int, default=0, help="bench: decode pairs")
    args = p.parse_args(argv)
    _set_threads(args.threads)
    presets = args.presets.split(",")
    if args.kind == "logits":
        _check_import(args.src)
        worker_logits(presets, args.out)
    else:
        old_src, new_src = (Path(s) for s in args.src.split(","))
        worker_bench(old_src, new_src, presets, args.pairs, args.out)


# ============================================================================================== parent
def describe_src(src: Path) -> str:
    """``src`` with its checkout's short commit (and ``+dirty`` when it has uncommitted changes)."""
    try:
        git = ["git", "-C", str(src)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True,
                               check=True).stdout.strip()
        return f"{src} ({commit}{'+dirty' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        return str(src)


def run_worker(src: Path, kind: str, presets: list[str], out: Path, threads: int, timeout: float) -> None:
    """This script as a worker under ``src``: a fresh interpreter whose only hybridlm is ``src``'s."""
    env = dict(os.environ, PYTHONPATH=str(src))
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})
    cmd = [sys.executable, str(Path(__file__).resolve()), WORKER, kind, "--src", str(src), "--threads",
           str(threads), "--presets", ",".join(presets), "--out", str(out)]
    # the worker's stdout goes to stderr: this process's stdout carries only the report
    subprocess.run(cmd, env=env, check=True, timeout=timeout, stdout=sys.stderr)


def _compiles(kind: str, out: Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        return json.loads(f.metadata()["numba_compiles"])


def run_cached(src: Path, kind: str, presets: list[str], out: Path, threads: int, timeout: float) -> int | None:
    """``run_worker``, run again when the first run compiled numba kernels rather than loading them from the cache
    (a fresh checkout, or a kernel whose source changed): results of both versions then come from cached kernels,
    which can round differently from kernels compiled in-process. Returns the second run's compile count (0 or
    None normally; more: numba could not cache them, and the results may differ for that reason alone)."""
    run_worker(src, kind, presets, out, threads, timeout)
    compiles = _compiles(kind, out)
    if compiles:
        print(f"  ({src}: numba compiled {compiles} kernels in-process; running again from its cache)",
              file=sys.stderr, flush=True)
        run_worker(src, kind, presets, out, threads, timeout)
        compiles = _compiles(kind, out)
    return compiles


# ------------------------------------------------------------------------------------------ logits
def _bitwise_equal(a, b) -> bool:
    # bitwise, not by value: identical NaNs count as equal, 0.0 and -0.0 do not
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def _max_abs_diff(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _first_step(a, b) -> int | None:
    """The first index along dim 0 where ``a`` and ``b`` (same shape) differ bitwise."""
    for i in range(a.shape[0]):
        if not _bitwise_equal(a[i].contiguous(), b[i].contiguous()):
            return i
    return None


def compare_logit_files(old: Path, new: Path, presets: list[str]) -> list[dict[str, Any]]:
    """Per preset: equal or not, the largest absolute difference, the first differing tensor."""
    from safetensors import safe_open

    with safe_open(str(old), framework="pt") as fo, safe_open(str(new), framework="pt") as fn:
        meta_old, meta_new = fo.metadata(), fn.metadata()
        keys_old, keys_new = json.loads(meta_old["order"]), set(json.loads(meta_new["order"]))
        errors = {"old": json.loads(meta_old["errors"]), "new": json.loads(meta_new["errors"])}
        rows = []
        for preset in presets:
            row: dict[str, Any] = {"preset": preset, "equal": True, "max_abs_diff": 0.0, "first_diff": None,
                                   "differing": [], "tokens_differ": {}}
            failed = {v: errors[v][preset] for v in ("old", "new") if preset in errors[v]}
            if failed:
                row.update(equal=False, max_abs_diff=None, error=failed)
                rows.append(row)
                continue
            for key in (k for k in keys_old if k.startswith(preset + "/")):
                name = key[len(preset) + 1:]
                if key not in keys_new:
                    row["differing"].append(name)
                    row.update(equal=False, max_abs_diff=float("inf"), first_diff=row["first_diff"] or name)
                    continue
                a, b = fo.get_tensor(key), fn.get_tensor(key)
                if _bitwise_equal(a, b):
                    continue
                where = name
                if a.shape == b.shape and name.endswith(("decode_logits", "tokens")):
                    step = _first_step(a, b)
                    where = f"{name}[step {step}]"
                    if name.endswith("tokens"):
                        row["tokens_differ"][name.split("/")[0]] = step
                row["equal"] = False
                row["differing"].append(where)
                row["first_diff"] = row["first_diff"] or where
                row["max_abs_diff"] = max(row["max_abs_diff"], _max_abs_diff(a, b))
            rows.append(row)
    return rows


def print_logit_report(rows: list[dict[str, Any]]) -> None:
    print(f"{'preset':<13} {'result':<7} {'max |diff|':>11}  first differing tensor")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<13} {'ERROR':<7} {'-':>11}  "
                  + "; ".join(f"{v}: {msg}" for v, msg in r["error"].items()))
            continue
        result = "equal" if r["equal"] else "DIFFERS"
        diff = f"{r['max_abs_diff']:.3g}" if not r["equal"] else "0"
        extra = ""
        if r["tokens_differ"]:
            extra = "; tokens differ from " + ", ".join(f"{b} step {s}" for b, s in r["tokens_differ"].items())
        print(f"{r['preset']:<13} {result:<7} {diff:>11}  {r['first_diff'] or '-'}{extra}")


def check_logits(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    files, compiles = {}, {}
    for version, src in (("old", args.old_src), ("new", args.new_src)):
        files[version] = work / f"logits-{version}.safetensors"
        print(f"[logits] {version}: {src}", file=sys.stderr, flush=True)
        compiles[version] = run_cached(src, "logits", args.presets, files[version], args.threads, args.timeout)
    rows = compare_logit_files(files["old"], files["new"], args.presets)
    print(f"\nlogits check ({args.threads} threads): old {describe_src(args.old_src)}, "
          f"new {describe_src(args.new_src)}")
    print_logit_report(rows)
    for version, n in compiles.items():
        if n:
            print(f"warning: {version} compiled {n} numba kernels in-process even on its second run (not cached?); "
                  "differences may come from that alone")
    return {"presets": rows, "all_equal": all(r["equal"] for r in rows), "numba_compiles": compiles,
            "files": {k: str(v) for k, v in files.items()} if args.save_dir else None}


# ------------------------------------------------------------------------------------------- bench
def check_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Both versions in one process (see ``worker_bench``): a drift of the machine then hits both sides of each pair
    alike, which one process per version, minutes apart or alive side by side, did not manage on this machine."""
    out = work / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})
    pairs = 40 * args.rounds
    cmd = [sys.executable, str(Path(__file__).resolve()), WORKER, "bench", "--src", f"{args.old_src},{args.new_src}",
           "--threads", str(args.threads), "--presets", ",".join(args.bench_presets), "--pairs", str(pairs),
           "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, timeout=args.timeout, stdout=sys.stderr)
    measured = json.loads(out.read_text())
    rows = []
    for result in measured["results"]:
        for metric, times in result["times"].items():
            ratios = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
            ratio = statistics.median(ratios)
            rows.append({"preset": result["preset"], "metric": metric, "pairs": len(ratios),
                         "old_median_s": statistics.median(times["old"]),
                         "new_median_s": statistics.median(times["new"]), "ratio": ratio,
                         "ratio_quartiles": statistics.quantiles(ratios, n=4), "slower": ratio > args.slower_than,
                         "old_s": times["old"], "new_s": times["new"]})
    print(f"\nbench ({args.threads} threads, float32, both versions in one process, calls alternated): "
          f"old {describe_src(args.old_src)}, new {describe_src(args.new_src)}")
    print(f"prefill: {BENCH_PREFILL} tokens (ms); decode: per token after {BENCH_DECODE_CONTEXT} (ms); new/old: "
          "median of the pairs' ratios (quartiles)")
    print(f"{'preset':<13} {'metric':<8} {'pairs':>5} {'old':>10} {'new':>10} {'new/old':>8}  quartiles")
    for r in rows:
        flag = f"  <-- above {args.slower_than}" if r["slower"] else ""
        q1, _, q3 = r["ratio_quartiles"]
        print(f"{r['preset']:<13} {r['metric']:<8} {r['pairs']:>5} {1e3 * r['old_median_s']:>10.2f} "
              f"{1e3 * r['new_median_s']:>10.2f} {r['ratio']:>8.3f}  {q1:.3f}-{q3:.3f}{flag}")
    load = measured["loadavg_1min"]
    if load > args.threads + 0.5:
        print(f"warning: the 1-minute load average was {load:.1f} at the end ({args.threads} threads of our own, "
              f"{os.cpu_count()} CPUs): other work shared the machine and the timings are unreliable")
    return {"rows": rows, "loadavg_1min": load, "slower_than": args.slower_than, "prefill_tokens": BENCH_PREFILL,
            "decode_context": BENCH_DECODE_CONTEXT}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old_src", type=Path, help="the src directory of the old checkout")
    p.add_argument("new_src", type=Path, help="the src directory of the new checkout")
    p.add_argument("--check", action="append", choices=["logits", "bench"],
                   help="logits and/or bench (repeatable; default both)")
    p.add_argument("--presets", default=",".join(LOGIT_PRESETS), help="comma-separated presets of the logits check")
    p.add_argument("--bench-presets", default=",".join(BENCH_PRESETS),
                   help="comma-separated presets of the bench check")
    p.add_argument("--threads", type=int, default=2, help="threads of each version's process (default 2)")
    p.add_argument("--rounds", type=int, default=5,
                   help="bench length: 40R decode pairs and max(4, 2R) prefill pairs per preset (default 5)")
    p.add_argument("--slower-than", type=float, default=1.03, help="flag new/old time ratios above this")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--save-dir", type=Path, help="keep the safetensors and per-run JSON here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one worker process may take")
    args = p.parse_args(argv)
    args.check = args.check or ["logits", "bench"]
    args.presets = [s for s in args.presets.split(",") if s]
    args.bench_presets = [s for s in args.bench_presets.split(",") if s]
    for name in ("old_src", "new_src"):
        src = getattr(args, name).resolve()
        if not (src / "hybridlm" / "__init__.py").is_file():
            p.error(f"{name}: {src} has no hybridlm package")
        setattr(args, name, src)
    if args.rounds < 1 or args.threads < 1:
        p.error("--rounds and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:
        worker_main(argv[1:])
        return 0
    args = parse_args(argv)
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    work = args.save_dir or Path(tempfile.mkdtemp(prefix="compare_commits-"))
    report: dict[str, Any] = {"old_src": describe_src(args.old_src), "new_src": describe_src(args.new_src),
                              "threads": args.threads, "python": sys.executable}
    try:
        if "logits" in args.check:
            report["logits"] = check_logits(args, work)
        if "bench" in args.check:
            report["bench"] = check_bench(args, work)
    except subprocess.CalledProcessError as e:
        print(f"error: a worker failed (exit {e.returncode}): {' '.join(e.cmd)}", file=sys.stderr)
        return 2
    finally:
        if not args.save_dir:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if "bench" in report:
        print("\n" + text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report.get("logits", {}).get("all_equal", True) else 1


if __name__ == "__main__":
    sys.exit(main())
