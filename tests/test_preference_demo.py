"""The offline preference demo: statement pairs from the corpus and the demo's run at small scale."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hybridlm.config import ModelConfig
from hybridlm.data.corpus import default_corpus_files
from hybridlm.data.statement_pairs import completes_statement, corrupt_last_closer, is_statement, statement_pairs
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer
from hybridlm.train.preference import sequence_logps
from hybridlm.train.preference_demo import (
    PreferenceDemoSettings,
    continue_prompts,
    measure,
    own_continuation_pairs,
    run_preference_demo,
    sign_test,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, expected", [
    ("x = f(a)\n", True), ("x = f(a\n", False), ("x = f(a))\n", False), ("    return [1, {2: 3}]\n", True),
    ("for x in range(3):\n", True), ("else:\n", True), ("except ValueError as e:\n", True),
    ("x = f(a)", False),  # no newline: the line never ended
    ("\n", False), ("# f(a)\n", False), ("x = 'a(' + b\n", True), ("x = f(a)\nnot python (\n", True),
])
def test_is_statement_reads_the_first_line(text, expected):
    assert is_statement(text) is expected


def test_corruption_touches_a_bracket_token_not_a_string():
    assert corrupt_last_closer("    f(x, ')')") == "    f(x, ')'"
    assert corrupt_last_closer("    f(x, ')')", double=True) == "    f(x, ')'))"
    assert corrupt_last_closer("    x = 1") is None
    assert corrupt_last_closer("d[k] = g(v)  # (c)") == "d[k] = g(v  # (c)"


def test_statement_pairs_from_the_corpus():
    files = default_corpus_files()
    train, held_out = statement_pairs(files, 60, 20, seed=3)
    assert (len(train), len(held_out)) == (60, 20)
    for pair in train + held_out:
        assert completes_statement(pair.prompt, pair.chosen) and not completes_statement(pair.prompt, pair.rejected)
        assert pair.chosen.endswith("\n") and "\n" not in pair.chosen[:-1]
        assert pair.prompt.rsplit("\n", 1)[-1].strip()  # the prompt shows how the line begins
        assert set(pair.chosen) & set(")]}")  # the cut is at or before the last closing bracket
    rejected_longer = sum(len(p.rejected) > len(p.chosen) for p in train + held_out)
    assert 0 < rejected_longer < 80  # both corruptions occur
    held_files = {p.where.rsplit(":", 1)[0] for p in held_out}
    assert held_files.isdisjoint(p.where.rsplit(":", 1)[0] for p in train)
    again = statement_pairs(files, 60, 20, seed=3)
    assert [p.record() for p in again[0] + again[1]] == [p.record() for p in train + held_out]
    assert statement_pairs(files, 60, 20, seed=4)[1][0].record() != held_out[0].record()


def test_statement_pairs_bad_arguments():
    with pytest.raises(ValueError, match="n_eval"):
        statement_pairs(default_corpus_files(), 10, 0)
    with pytest.raises(ValueError, match="files"):
        statement_pairs([], 10, 10)
    with pytest.raises(ValueError, match="fewer than"):
        statement_pairs(default_corpus_files()[:1], 10**6, 10)
    with pytest.raises(ValueError, match="families"):
        PreferenceDemoSettings(families=("rwkv",))


def test_sign_test_counts_and_p_value():
    before = [True, False, False, False, True, False]
    after = [True, True, True, True, False, False]
    result = sign_test(before, after)
    assert (result["gained"], result["lost"]) == (3, 1)
    assert result["p_value"] == pytest.approx(2 * (1 + 4) / 16)  # two-sided, k <= 1 of n = 4
    assert sign_test([True], [True])["p_value"] == 1.0


def test_measure_ranks_pairs_by_the_models_log_probs():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("mamba-tiny")).eval()
    tokenizer = ByteTokenizer()
    _, pairs = statement_pairs(default_corpus_files(), 1, 6)
    m = measure(model, tokenizer, pairs, max_new_tokens=5, batch_size=4)
    expected = []
    for p in pairs:  # one pair at a time, no padding
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(p.prompt)]
        logps = []
        for completion in (p.chosen, p.rejected):
            ids = torch.tensor([prompt + tokenizer.encode(completion)])
            labels = ids.clone()
            labels[0, :len(prompt)] = -100
            with torch.no_grad():
                logps.append(float(sequence_logps(model, ids, labels)[0]))
        expected.append(logps[0] > logps[1])
    assert m.prefers_chosen == pytest.approx(sum(expected) / len(pairs))
    assert len(m.is_statement) == len(pairs) and 0 <= m.statement_rate <= 1


def test_the_demo_runs_small(tmp_path):
    report = run_preference_demo(tmp_path, PreferenceDemoSettings.small())
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    row = report["families"]["mamba"]
    steps = [step for step, _ in row["eval_accuracy_curve"]]
    assert steps == [2, 4]
    for when in ("before", "after"):
        assert 0 <= row[when]["statement_rate"] <= 1 and 0 <= row[when]["prefers_chosen"] <= 1
    assert math.isfinite(row["pretrain_final_loss"])
    assert (tmp_path / "mamba" / "dpo" / "checkpoint").is_dir()
    own = row["own_pairs"]
    assert own["pairs"] == own["all_fail"] + own["mixed"] and sum(own.values()) - own["pairs"] == 32
    dpo_records = (tmp_path / "mamba" / "pairs_dpo.jsonl").read_text().splitlines()
    assert len(dpo_records) == 32 + own["pairs"]  # the corrupted pairs and the model's own
    records = [json.loads(line) for line in (tmp_path / "pairs_eval.jsonl").read_text().splitlines()]
    assert len(records) == 16 and set(records[0]) == {"prompt", "chosen", "rejected"}


def test_own_continuation_pairs_prefer_what_completes_the_statement():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("mamba-tiny")).eval()  # random weights: most continuations fail
    tokenizer = ByteTokenizer()
    pairs, _ = statement_pairs(default_corpus_files(), 12, 1, seed=1)
    own, counts = own_continuation_pairs(model, tokenizer, pairs, samples=2, temperature=1.0, max_new_tokens=8)
    assert sum(counts.values()) == len(pairs) and len(own) == counts["all_fail"] + counts["mixed"]
    assert counts["all_fail"] > 0
    prompts = {p.prompt: p for p in pairs}
    for pair in own:
        assert completes_statement(pair.prompt, pair.chosen) and not completes_statement(pair.prompt, pair.rejected)
        if prompts[pair.prompt].chosen != pair.chosen:  # the model's own line that parses, not the true one
            own_lines = [continue_prompts(model, tokenizer, [pair.prompt], 8, t, seed=s)[0]
                         for t, s in ((0.0, None), (1.0, 0), (1.0, 1))]
            assert pair.chosen in own_lines
    again, _ = own_continuation_pairs(model, tokenizer, pairs, samples=2, temperature=1.0, max_new_tokens=8)
    assert [p.record() for p in again] == [p.record() for p in own]  # seeded: the same pairs in any batch
