"""What a DPO step costs against an SFT step on the same tokens.

    python benchmarks/dpo_cost.py --presets mamba-130m,llama-130m,jamba-130m --pairs 2 --prompt 128 --completion 128

Each preset, random weights, fp32: one batch of ``--pairs`` preference pairs (random token ids) makes ``2 * pairs``
rows of prompt + completion. An SFT step is the next-token loss on those rows (the prompt masked), backward and an
AdamW step; a DPO step is the sigmoid loss over the same rows with the reference log-probs from a frozen copy (a
forward without grad on every step) or precomputed once. The three steps are interleaved round by round and the
median of ``--rounds`` is reported, with each DPO step's ratio to the SFT step. The issue's bounds: at most 2.2x
with a frozen reference, 2x precomputed. Table on stdout; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.data.chat_examples import PreferencePair
from hybridlm.data.preference_source import PreferenceSource
from hybridlm.train.config import TrainConfig
from hybridlm.train.objective import NextTokenLoss
from hybridlm.train.preference import FrozenReference, PrecomputedReference, PreferenceObjective
from hybridlm.train.preference_losses import PreferenceLoss
from hybridlm.train.trainer import make_optimizer

BOUNDS = {"dpo_frozen": 2.2, "dpo_precomputed": 2.0}


def preference_batch(vocab_size: int, pairs: int, prompt: int, completion: int, seed: int = 0):
    """One batch of ``pairs`` random pairs: (2 * pairs, prompt + completion) ids, completion-only labels."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab_size, (n,), generator=g).tolist()

    made = [PreferencePair(ids(prompt), ids(completion), ids(completion)) for _ in range(pairs)]
    source = PreferenceSource(made, made[:1], prompt + completion, pad_id=0)
    return source, source.batch(made, list(range(pairs)), held_out=False)


def step_timer(model: HybridLM, loss_of: Callable[[], torch.Tensor]) -> Callable[[], float]:
    """A function that runs one optimizer step of ``loss_of`` and returns its seconds."""
    optimizer = make_optimizer(model, TrainConfig(lr=1e-5, weight_decay=0.0))

    def run() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_of().backward()
        optimizer.step()
        return time.perf_counter() - start

    return run


def measure(preset: str, pairs: int, prompt: int, completion: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    config = ModelConfig.preset(preset)
    source, batch = preference_batch(config.vocab_size, pairs, prompt, completion)
    # one model per step kind, all from the same weights, so no kind's updates change another's inputs
    models = {kind: HybridLM(config).train() for kind in ("sft", "dpo_frozen", "dpo_precomputed")}
    for model in models.values():
        model.load_state_dict(models["sft"].state_dict())
    sft = NextTokenLoss(config.moe_aux_loss_coef)
    frozen = PreferenceObjective(PreferenceLoss(), FrozenReference(models["dpo_frozen"]))
    precomputed = PreferenceObjective(PreferenceLoss(), PrecomputedReference(
        models["dpo_precomputed"], [batch], torch.device("cpu")))
    steps = {"sft": step_timer(models["sft"], lambda: sft(models["sft"], (batch.input_ids, batch.labels))[0]),
             "dpo_frozen": step_timer(models["dpo_frozen"], lambda: frozen(models["dpo_frozen"], batch)[0]),
             "dpo_precomputed": step_timer(models["dpo_precomputed"],
                                           lambda: precomputed(models["dpo_precomputed"], batch)[0])}
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for run in steps.values():  # warm-up: allocator, optimizer state
        run()
    for _ in range(rounds):
        for kind, run in steps.items():
            times[kind].append(run())
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    return {"preset": preset, "tokens": batch.input_ids.numel(), **{f"{k}_s": v for k, v in medians.items()},
            **{f"{k}_ratio": medians[k] / medians["sft"] for k in BOUNDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="mamba-130m,llama-130m,jamba-130m")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--completion", type=int, default=128, help="completion tokens per row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(p, args.pairs, args.prompt, args.completion, args.rounds) for p in args.presets.split(",")]
    print(f"DPO step vs SFT step on the same tokens: {args.pairs} pairs x ({args.prompt} prompt + {args.completion} "
          f"completion), fp32, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'preset':<14}{'tokens':>8}{'SFT s':>9}{'DPO frozen s':>14}{'ratio':>7}{'DPO precomp. s':>16}{'ratio':>7}")
    for r in rows:
        print(f"{r['preset']:<14}{r['tokens']:>8}{r['sft_s']:>9.3f}{r['dpo_frozen_s']:>14.3f}"
              f"{r['dpo_frozen_ratio']:>6.2f}x{r['dpo_precomputed_s']:>16.3f}{r['dpo_precomputed_ratio']:>6.2f}x")
    within = all(r[f"{k}_ratio"] <= bound for r in rows for k, bound in BOUNDS.items())
    print(f"bounds (frozen <= {BOUNDS['dpo_frozen']}x, precomputed <= {BOUNDS['dpo_precomputed']}x): "
          f"{'met' if within else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows, "bounds": BOUNDS, "within": within}, f, indent=1)


if __name__ == "__main__":
    main()
