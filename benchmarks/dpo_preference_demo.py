"""The offline preference demo (issue 20): DPO on statement pairs from the standard library, for a Mamba, a
Transformer and a hybrid. See ``hybridlm.train.preference_demo`` for the method.

    python benchmarks/dpo_preference_demo.py --out runs/dpo-demo --json benchmarks/results/dpo-preference-demo.json

Prints one row per family: held-out rewards/accuracies at the first and last evaluation, the model's own
preference for the chosen line, the share of greedy continuations that are a Python statement and that are the
true line (before DPO -> after), and the paired count of prompts that gained/lost the property with its
sign-test p-value.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hybridlm.train.preference_demo import FAMILIES, PreferenceDemoSettings, format_report, run_preference_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/dpo-demo", help="directory for the models, pairs and report.json")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {list(FAMILIES)}")
    parser.add_argument("--pretrain-steps", type=int, default=PreferenceDemoSettings.pretrain_steps)
    parser.add_argument("--dpo-steps", type=int, default=PreferenceDemoSettings.dpo_steps)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    settings = PreferenceDemoSettings(families=tuple(args.families.split(",")), pretrain_steps=args.pretrain_steps,
                                      dpo_steps=args.dpo_steps)
    started = time.perf_counter()
    report = run_preference_demo(args.out, settings, progress=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(format_report(report))
    print(f"({report['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
