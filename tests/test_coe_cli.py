"""``hybridlm coe build|eval|demo``: the commands end to end on tiny models, and their argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybridlm.cli import main
from hybridlm.coe.evaluation import cost_quality_curve, gap_closed, routing_metrics
from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_numbers_on_a_constructed_case():
    # 4 prompts, 2 experts; the oracle picks 0, 1, 1, 0; the router gets the first three right.
    losses = torch.tensor([[1.0, 3.0], [4.0, 2.0], [5.0, 1.0], [2.0, 2.5]], dtype=torch.float64)
    metrics = routing_metrics(losses, routed=[0, 1, 1, 1], answered=[0, 1, 1, 1], params=[100, 300])
    assert metrics["routing_accuracy"] == 0.75
    assert metrics["loss"]["oracle"] == pytest.approx((1 + 2 + 1 + 2) / 4)
    assert metrics["loss"]["composition"] == pytest.approx((1 + 2 + 1 + 2.5) / 4)
    assert metrics["loss"]["best_single"] == pytest.approx(min(12 / 4, 8.5 / 4))  # expert 1: 2.125
    assert metrics["best_single_expert"] == 1
    assert metrics["gap_closed"] == pytest.approx((2.125 - 1.625) / (2.125 - 1.5))
    assert metrics["quality_vs_oracle"] == pytest.approx(1.5 / 1.625)
    assert metrics["better_than_every_single"]
    assert metrics["compute_per_token"] == pytest.approx((100 + 3 * 300) / 4 / 400)
    curve = cost_quality_curve(losses, [0, 1, 1, 1], [0.9, 0.6, 0.8, 0.7], fallback=0)
    assert [p["fallback_share"] for p in curve] == [0, 0, 0.25, 0.5, 0.75, 1.0]
    assert curve[2]["loss"] == pytest.approx((1 + 4 + 1 + 2.5) / 4)  # prompt 1 (confidence 0.6) falls back
    assert curve[-1]["loss"] == pytest.approx(3.0)  # everything to expert 0
    assert gap_closed(2.0, 2.0, 2.0) == 1.0


def _expert(path: Path, preset: str, seed: int) -> Path:
    torch.manual_seed(seed)
    HybridLM(ModelConfig.preset(preset)).save_pretrained(path)
    return path


def test_build_and_eval_commands(tmp_path, capsys):
    a, b = _expert(tmp_path / "a", "llama-tiny", 0), _expert(tmp_path / "b", "mamba-tiny", 1)
    rows = [{"prompt": f"def f{i}(x): return x", "completion": " + 1"} for i in range(4)]
    rows += [{"prompt": f"The sky is blue today {i}.", "completion": " It is"} for i in range(4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["coe", "build", str(tmp_path / "coe"), "--expert", f"a={a}", "--expert", f"b={b}", "--data", str(data),
          "--router", "logistic", "--threshold", "0.4", "--fallback", "b"])
    config = json.loads((tmp_path / "coe" / "coe.json").read_text())
    assert [e["name"] for e in config["experts"]] == ["a", "b"] and config["fallback"] == "b"
    capsys.readouterr()
    main(["coe", "eval", str(tmp_path / "coe"), "--data", str(data), "--gen-tokens", "2"])
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    assert "routing accuracy" in printed and 0 <= result["routing_accuracy"] <= 1
    assert result["loss"]["oracle"] <= result["loss"]["composition"]
    curve = json.loads((tmp_path / "coe" / "cost_quality.json").read_text())
    assert curve["fallback"] == "b" and curve["points"][-1]["fallback_share"] == 1.0
    # The labels the oracle gave at build time are the ones eval's oracle finds on the same data.
    assert config["calibration"]["labels"] == {n: round(s * 8) for n, s in result["oracle_share"].items()}


@pytest.mark.parametrize(("args", "message"), [
    (["--expert", "a"], "--expert: expected NAME=DIR"),
    (["--router", "tree"], "--router: unknown router kind 'tree'"),
    (["--fallback", "zzz", "--threshold", "0.5"], "--fallback: unknown expert 'zzz'"),
    (["--empty"], "--data: .*holds no records"),
])
def test_build_command_errors_name_the_argument(tmp_path, args, message):
    a, b = _expert(tmp_path / "a", "llama-tiny", 0), _expert(tmp_path / "b", "llama-tiny", 1)
    data = tmp_path / "d.jsonl"
    data.write_text("" if "--empty" in args else json.dumps({"prompt": "x", "expert": "a"}) + "\n")
    argv = ["coe", "build", str(tmp_path / "coe"), "--expert", f"a={a}", "--expert", f"b={b}", "--data", str(data)]
    with pytest.raises(SystemExit, match=message):
        main(argv + [x for x in args if x != "--empty"])
    assert not (tmp_path / "coe").exists()


def test_demo_tiny_runs_end_to_end(tmp_path, capsys):
    main(["coe", "demo", str(tmp_path / "demo"), "--size", "tiny", "--no-progress"])
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(summary["eval"]["loss"]["per_expert"]) == {"code", "prose", "arith"}
    assert len({summary["experts"][n] for n in ("code", "prose", "arith")}) == 3  # three families
    assert "demo:" in capsys.readouterr().out
