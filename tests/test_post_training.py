"""Post-training: data in TRL's formats, the preference losses, references, LoRA adapters, and the sft/dpo runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from post_training_models import write_jsonl

from hybridlm.chat_template import ChatTemplate
from hybridlm.cli import main
from hybridlm.config import ModelConfig
from hybridlm.data.chat_examples import preference_texts, sft_segments, tokenize_pair, tokenize_segments
from hybridlm.data.preference_source import IGNORE, PreferenceSource
from hybridlm.data.records import Record, RecordError, read_records
from hybridlm.generation import generate
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer
from hybridlm.train.lora import LoraSettings, apply_lora, default_targets, load_adapter, merged
from hybridlm.train.post_training import run_dpo, run_sft
from hybridlm.train.preference import FrozenReference, PrecomputedReference, PreferenceObjective, sequence_logps
from hybridlm.train.preference_losses import PreferenceLoss

TOKENIZER = ByteTokenizer()
TEMPLATE = ChatTemplate()
PAIRS = [{"prompt": f"Q{i}: what is {i} + {i}?", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1} or so."}
         for i in range(12)]


def tiny(tmp_path: Path, preset: str = "mamba-tiny") -> Path:
    torch.manual_seed(0)
    path = tmp_path / preset
    HybridLM(ModelConfig.preset(preset)).save_pretrained(path)
    return path


def pair_source(records=PAIRS, seq_len: int = 64) -> PreferenceSource:
    pairs = [tokenize_pair(TOKENIZER, *preference_texts(Record(str(i), r), TEMPLATE)) for i, r in enumerate(records)]
    return PreferenceSource(pairs, pairs[:2], seq_len, TOKENIZER.pad_token_id)


# ------------------------------------------------------------------------------------------- data
def test_every_trl_format_reads_and_errors_name_file_line_and_field(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    sft = [Record("a", {"messages": messages}), Record("b", {"prompt": "2+2=", "completion": "4"}),
           Record("c", {"text": "plain text"})]
    trained = ["".join(t for t, trained in sft_segments(r, TEMPLATE) if trained) for r in sft]
    assert trained[1:] == ["4", "plain text"]
    assert trained[0].startswith("hello") and "hi" not in trained[0]  # the assistant turn alone is trained
    rendered = TEMPLATE.render(messages).removesuffix(TEMPLATE.generation_prompt)  # serve adds the next turn
    assert "".join(t for t, _ in sft_segments(sft[0], TEMPLATE)) == rendered
    # conversational and implicit-prompt preferences give the same texts as the explicit form
    explicit = preference_texts(Record("d", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
                                TEMPLATE)
    implicit = preference_texts(Record("e", {"chosen": "The sky is blue.", "rejected": "The sky is green."}),
                                TEMPLATE)
    assert implicit == explicit == ("The sky is", " blue.", " green.")
    chat = preference_texts(Record("f", {"prompt": messages[:1], "chosen": [messages[1]],
                                         "rejected": [{"role": "assistant", "content": "go away"}]}), TEMPLATE)
    assert chat[0].endswith(TEMPLATE.generation_prompt) and "hello" in chat[1] and "go away" in chat[2]

    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], {"prompt": "p", "chosen": 3, "rejected": "r"}])
    bad = read_records(data)[1]
    with pytest.raises(RecordError, match=r"pairs.jsonl:2: field 'chosen': expected a non-empty string"):
        preference_texts(bad, TEMPLATE)
    (tmp_path / "broken.jsonl").write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    with pytest.raises(RecordError, match=r"broken.jsonl:2: not valid JSON"):
        read_records(tmp_path / "broken.jsonl")
    with pytest.raises(RecordError, match=r"field 'messages'.*no assistant message"):
        sft_segments(Record("g", {"messages": messages[:1]}), TEMPLATE)


def test_parquet_and_arrow_read_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")  # the post extra; the test extra installs it
    table = datasets.Dataset.from_list(PAIRS[:3])
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "pairs.parquet", arrow):
        assert [r.fields for r in read_records(path)] == PAIRS[:3]


def test_a_trained_completion_ends_with_eos_and_the_prompt_is_masked():
    example = tokenize_segments(TOKENIZER, [("Q: 1+1?", False), (" 2", True)])
    assert example.ids == TOKENIZER.encode("Q: 1+1? 2", add_bos=True) + [TOKENIZER.eos_token_id]
    assert example.trained == [False] * 8 + [True] * 3


# ------------------------------------------------------------------------------------------ losses
def test_each_loss_equals_its_formula():
    torch.manual_seed(1)
    c, r, rc, rr = (torch.randn(5) * 3 - 10 for _ in range(4))
    lc, lr = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([2, 5, 5, 1, 9])
    beta, eps, gamma = 0.2, 0.1, 0.7
    d = (c - rc) - (r - rr)
    expected = {
        "sigmoid": -torch.log(torch.sigmoid(beta * d)),
        "hinge": torch.clamp(1 - beta * d, min=0),
        "ipo": ((c - rc) / lc - (r - rr) / lr - 1 / (2 * beta)) ** 2,
        "robust": (-(1 - eps) * torch.log(torch.sigmoid(beta * d)) + eps * torch.log(torch.sigmoid(-beta * d)))
        / (1 - 2 * eps),
        "simpo": -torch.log(torch.sigmoid(beta * (c / lc - r / lr) - gamma)),
    }
    pc, pr = torch.exp(c / lc), torch.exp(r / lr)
    expected["orpo"] = -c / lc - beta * torch.log(torch.sigmoid(torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))))
    for kind, want in expected.items():
        loss = PreferenceLoss(kind, beta, eps if kind == "robust" else 0.0, gamma)
        got, reward_c, reward_r = loss(c, r, lc, lr, rc, rr)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=kind)
        want_c = beta * (c / lc if kind in ("simpo", "orpo") else c - rc)
        torch.testing.assert_close(reward_c, want_c, msg=kind)
    with pytest.raises(ValueError, match="loss: expected one of"):
        PreferenceLoss("kto")
    with pytest.raises(ValueError, match="label_smoothing: only the robust loss"):
        PreferenceLoss("sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="sft_weight: expected a number >= 0, got -1"):
        PreferenceLoss("sigmoid", sft_weight=-1)
    # RPO's term: the batch's chosen tokens' mean NLL (a token-mean, as TRL's, not a mean of per-pair means)
    assert float(PreferenceLoss(sft_weight=1.0).sft_loss(c, lc)) == pytest.approx(float(-c.sum() / lc.sum()))


def test_padded_log_probs_equal_each_sequence_alone():
    model = HybridLM(ModelConfig.preset("jamba-tiny")).eval()
    source = pair_source()
    batch = source.batch(source.train_pairs[:5], list(range(5)), held_out=False)
    sums, counts, _ = sequence_logps(model, batch.input_ids, batch.labels)
    for row in range(10):
        n = int((batch.input_ids[row] != TOKENIZER.pad_token_id).sum())
        alone = sequence_logps(model, batch.input_ids[row : row + 1, :n], batch.labels[row : row + 1, :n])[0]
        torch.testing.assert_close(sums[row : row + 1], alone, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [int((lab != IGNORE).sum()) for lab in batch.labels]
    pair = source.train_pairs[0]
    assert counts[0] == len(pair.chosen) and counts[5] == len(pair.rejected)


def test_precomputed_reference_equals_the_frozen_copy():
    model = HybridLM(ModelConfig.preset("llama-tiny"))
    source = pair_source()
    precomputed = PrecomputedReference(model, source.all_batches(4), torch.device("cpu"))
    frozen = FrozenReference(model)
    for batch in (source.train_batch(0, 0, 4), next(source.eval_batches(2, 1))):
        torch.testing.assert_close(precomputed.logps(batch), frozen.logps(batch), rtol=1e-6, atol=1e-5)


def test_a_policy_that_never_moves_warns_that_nothing_learns():
    model = HybridLM(ModelConfig.preset("mamba-tiny"))
    objective = PreferenceObjective(PreferenceLoss(), FrozenReference(model))
    batch = pair_source().train_batch(0, 0, 2)
    with pytest.warns(UserWarning, match="nothing is learning"):
        for _ in range(25):
            loss, metrics = objective(model, batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)


# -------------------------------------------------------------------------------------------- LoRA
def test_default_targets_cover_every_family_and_a_wrong_target_is_named():
    assert default_targets(HybridLM(ModelConfig.preset("mamba-tiny"))) == (
        ["dt_proj", "in_proj", "out_proj", "x_proj"], [])
    modules, experts = default_targets(HybridLM(ModelConfig.preset("jamba-tiny")))
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj"} <= set(modules)
    assert "router" not in modules and experts == ["gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError, match=r"--lora targets: \['qkv'\] match no linear layer"):
        apply_lora(HybridLM(ModelConfig.preset("llama-tiny")), LoraSettings(targets=("qkv",)))
    with pytest.raises(ValueError, match="--lora: unknown key 'rank'"):
        LoraSettings.parse("rank=4")


@pytest.mark.parametrize("preset", ["mamba-tiny", "llama-tiny", "jamba-tiny"])
def test_an_adapter_is_never_bypassed_and_merges_to_the_same_logits(preset, tmp_path):
    torch.manual_seed(0)
    base = HybridLM(ModelConfig.preset(preset))
    ids = torch.randint(0, 256, (2, 12))
    before = base(ids).logits.detach()
    model = apply_lora(base, LoraSettings(r=4))
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a fresh adapter is zero: give it something to add
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        assert (adapted - before).abs().max() > 1e-3  # every target's forward runs the adapter
        # decoding (the fused kernels step aside for wrapped modules) equals the full forward
        out = generate(model.base_model.model, ids[:1, :6], max_new_tokens=4, temperature=0.0)
        full = model(out[:, :-1]).logits[:, 5:].argmax(-1)
        assert torch.equal(out[0, 6:], full[0])
        model.save_pretrained(str(tmp_path / "adapter"))
        plain = merged(model)
        torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        assert not any("lora" in n for n, _ in plain.named_parameters())
        # the merged model decodes through the fused path with the unmerged logits
        greedy = generate(plain, ids[:1, :6], max_new_tokens=4, temperature=0.0)
        assert torch.equal(greedy, out)
    # the adapter saved in peft's format, loaded onto the same base weights, gives the adapted logits again
    torch.manual_seed(0)
    reloaded = load_adapter(HybridLM(ModelConfig.preset(preset)), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- the runs
def test_sft_then_dpo_from_the_cli_learn_resume_and_merge(tmp_path, capsys):
    model = tiny(tmp_path, "llama-tiny")
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                                   for p in PAIRS])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = ["--steps", "4", "--batch-size", "4", "--seq-len", "48", "--eval-every", "2", "--log-every", "1",
              "--no-progress", "--seed", "0"]
    main(["sft", str(model), "--data", str(sft_data), "--out", str(tmp_path / "sft"), "--lr", "3e-3", *common])
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    checkpoint = tmp_path / "sft" / "checkpoint"
    assert ChatTemplate.for_checkpoint(checkpoint) == TEMPLATE

    main(["dpo", str(checkpoint), "--data", str(pairs), "--out", str(tmp_path / "dpo"), "--lr", "3e-3",
          "--lora", "r=4", "--merge", *common])
    metrics = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}
    assert names <= set(metrics[0]) and {f"eval_{n}" for n in names} <= set().union(*metrics)
    assert (tmp_path / "dpo" / "checkpoint" / "adapter_config.json").is_file()
    merged_model = HybridLM.from_pretrained(tmp_path / "dpo" / "merged")
    assert not any("lora" in n for n, _ in merged_model.named_parameters())

    # resume continues the same run: 4 more steps, the run's own settings
    main(["dpo", "--resume", str(tmp_path / "dpo"), "--steps", "6", "--no-progress"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6
    with pytest.raises(ValueError, match="is not a `hybridlm sft` run"):
        run_sft(None, None, resume=tmp_path / "dpo")


def test_a_resumed_dpo_run_keeps_its_loss_and_a_changed_one_is_refused(tmp_path):
    model = tiny(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    settings = {"steps": 2, "batch_size": 2, "seq_len": 48, "eval_every": 2, "log_every": 1}
    run_dpo(model, data, tmp_path / "ipo", loss="ipo", beta=0.3, reference="precomputed", settings=settings,
            progress=False)
    result = run_dpo(None, None, resume=tmp_path / "ipo", settings={"steps": 3}, progress=False)
    assert max(r["step"] for r in result.history) == 3
    with pytest.raises(ValueError, match="objective"):
        run_dpo(None, None, resume=tmp_path / "ipo", loss="sigmoid", settings={"steps": 4}, progress=False)


@pytest.mark.parametrize("reference", ["frozen", "precomputed"])
def test_dpo_raises_held_out_reward_accuracy(reference, tmp_path):
    model = tiny(tmp_path, "mamba-tiny")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = run_dpo(model, data, tmp_path / "out", eval_data=data, reference=reference, beta=0.5, progress=False,
                     settings={"steps": 30, "batch_size": 6, "lr": 5e-3, "seq_len": 48, "eval_every": 30,
                               "log_every": 10, "warmup_steps": 2})
    final = [r for r in result.history if "eval_rewards/accuracies" in r][-1]
    assert final["eval_rewards/accuracies"] >= 0.9
    assert final["eval_rewards/margins"] > 0


def test_bad_run_arguments_are_named(tmp_path):
    model = tiny(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(ValueError, match="--reference: expected one of"):
        run_dpo(model, data, tmp_path / "o", reference="copy")
    with pytest.raises(ValueError, match="--reference adapter: needs --lora"):
        run_dpo(model, data, tmp_path / "o", reference="adapter")
    with pytest.raises(FileNotFoundError, match="model: .* is not a checkpoint directory"):
        run_sft(tmp_path / "missing", data, tmp_path / "o")
    with pytest.raises(ValueError, match="--merge: only a run with --lora"):
        run_sft(model, write_jsonl(tmp_path / "sft.jsonl", [{"text": "a b c"}] * 4), tmp_path / "o2", merge=True,
                progress=False, settings={"steps": 1, "batch_size": 2, "seq_len": 16})


def test_logps_mask_the_prompt():
    model = HybridLM(ModelConfig.preset("mamba-tiny")).eval()
    batch = pair_source().batch(pair_source().train_pairs[:1], [0], held_out=False)
    sums = sequence_logps(model, batch.input_ids, batch.labels)[0]
    logits = model(batch.input_ids).logits[:, :-1]
    token = F.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    prompt = len(pair_source().train_pairs[0].prompt)
    lengths = (batch.input_ids != TOKENIZER.pad_token_id).sum(1)
    for row in range(2):
        expected = token[row, prompt - 1 : int(lengths[row]) - 1].sum()
        torch.testing.assert_close(sums[row], expected, rtol=1e-5, atol=1e-5)
