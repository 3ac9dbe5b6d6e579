"""Post-training equals TRL's on the same model: DPOTrainer's loss, reward metrics and gradients (sigmoid, IPO),
and SFTTrainer's completion-only loss, for a Mamba, a Llama and a Jamba (MoE).

Both sides run in float32 (TRL's configs default to bf16 autocast, which its trainer wraps the reference in). The
MoE balance loss is left out of the comparison (coefficient 0 on both sides): ours is the Switch loss of each MoE
layer, summed over layers; transformers pools the router statistics of all layers first (and leaves padding out), so
the two differ by design (docs/post_training.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interop_models import perturb
from post_training_models import preference_records, save_hf_model

from hybridlm.chat_template import ChatTemplate
from hybridlm.data.chat_examples import preference_texts, sft_segments, tokenize_pair, tokenize_segments
from hybridlm.data.preference_source import IGNORE, PreferenceSource
from hybridlm.data.records import Record
from hybridlm.data.sft_source import SFTSource
from hybridlm.interop import FORMATS, resolve_format
from hybridlm.interop.table import export_tensors
from hybridlm.model import HybridLM
from hybridlm.tokenizer import load_tokenizer
from hybridlm.train.objective import NextTokenLoss
from hybridlm.train.preference import FrozenReference, PreferenceObjective
from hybridlm.train.preference_losses import PreferenceLoss

KINDS = ["mamba", "llama", "jamba"]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]
N_PAIRS = 6


@pytest.fixture(scope="module", params=KINDS)
def checkpoints(request, tmp_path_factory):
    """(reference, policy): a model of the kind and a perturbed copy, both in Hugging Face's layout."""
    root = tmp_path_factory.mktemp(request.param)
    reference = save_hf_model(request.param, root / "reference")
    from transformers import AutoModelForCausalLM

    policy = perturb(AutoModelForCausalLM.from_pretrained(reference), scale=0.02)
    policy.save_pretrained(root / "policy")
    (root / "policy").joinpath("tokenizer.json").write_bytes((reference / "tokenizer.json").read_bytes())
    (root / "policy").joinpath("tokenizer_config.json").write_bytes(
        (reference / "tokenizer_config.json").read_bytes())
    return request.param, reference, root / "policy"


def _trl_dpo(reference: Path, policy: Path, records: list[dict], loss_type: str, beta: float, out: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    kinds = loss_type.split("+")  # "sigmoid+sft": RPO, DPO plus the chosen tokens' NLL at weight 1
    args = DPOConfig(output_dir=str(out), beta=beta, loss_type=kinds, loss_weights=[1.0] * len(kinds),
                     per_device_train_batch_size=N_PAIRS,
                     max_length=64, report_to=[], use_cpu=True, bf16=False, router_aux_loss_coef=0.0,
                     dataset_num_proc=None)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy), args=args,
                         ref_model=AutoModelForCausalLM.from_pretrained(reference),
                         train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(policy))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    grads = {name: p.grad for name, p in trainer.model.named_parameters()}
    return batch, float(loss), metrics, _per_expert(grads)


def _per_expert(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 holds a layer's experts stacked (``experts.gate_up_proj`` (e, 2 d_ff, d), ``experts.down_proj``);
    checkpoints, and so our export, name each expert's matrices: the gradients under the checkpoint's names."""
    out = {}
    for name, grad in grads.items():
        prefix, _, leaf = name.rpartition(".experts.")
        if not prefix:
            out[name] = grad
            continue
        for e in range(grad.shape[0]):
            if leaf == "gate_up_proj":
                gate, up = grad[e].chunk(2, dim=0)
                out[f"{prefix}.experts.{e}.gate_proj.weight"], out[f"{prefix}.experts.{e}.up_proj.weight"] = gate, up
            else:
                out[f"{prefix}.experts.{e}.{leaf}.weight"] = grad[e]
    return out


def _ours_dpo(reference: Path, policy: Path, records: list[dict], loss_type: str, beta: float):
    tokenizer, template = load_tokenizer(policy), ChatTemplate.for_checkpoint(policy)
    pairs = [tokenize_pair(tokenizer, *preference_texts(Record(f"r{i}", r), template)) for i, r in enumerate(records)]
    source = PreferenceSource(pairs, pairs[:1], seq_len=64, pad_id=tokenizer.pad_token_id)
    batch = source.batch(source.train_pairs, list(range(len(pairs))), held_out=False)
    model = HybridLM.from_pretrained(policy).train()
    kind, _, sft = loss_type.partition("+")
    objective = PreferenceObjective(PreferenceLoss(kind, beta, sft_weight=1.0 if sft else 0.0),
                                    FrozenReference(HybridLM.from_pretrained(reference)), 0.0, "frozen")
    loss, metrics = objective.compute(model, batch)
    loss.backward()
    table = FORMATS[resolve_format(model, "hf")].TABLE
    grads = export_tensors(table, {name: p.grad for name, p in model.named_parameters()})
    return batch, float(loss), {k: float(v) for k, v in metrics.items()}, grads


def _close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-4) -> bool:
    return float((ours - theirs).norm()) <= rtol * float(theirs.norm()) + 1e-7


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid+sft"])
def test_dpo_loss_rewards_and_gradients_equal_trl(checkpoints, loss_type, tmp_path):
    kind, reference, policy = checkpoints
    records = preference_records(N_PAIRS)
    trl_batch, trl_loss, trl_metrics, trl_grads = _trl_dpo(reference, policy, records, loss_type, 0.1, tmp_path)
    batch, loss, metrics, grads = _ours_dpo(reference, policy, records, loss_type, 0.1)

    assert torch.equal(batch.input_ids, trl_batch["input_ids"])
    assert torch.equal(batch.labels != IGNORE, trl_batch["completion_mask"].bool())
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert abs(metrics["rewards/margins"]) > 1e-3  # the policy differs from the reference: a real comparison
    for name in METRICS:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-6), name
    assert set(grads) == set(trl_grads)
    bad = [n for n in grads if not _close(grads[n], trl_grads[n])]
    assert not bad, f"{kind}: gradients differ from TRL's for {bad[:5]}"


def test_sft_completion_only_loss_equals_trl(checkpoints, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    kind, _, policy = checkpoints
    records = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_records(N_PAIRS)]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=N_PAIRS, max_length=64, report_to=[],
                     use_cpu=True, bf16=False, completion_only_loss=True, packing=False, router_aux_loss_coef=0.0,
                     dataset_num_proc=None)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(policy), args=args,
                         train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(policy))
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_PAIRS)])
    trainer.model.train()
    trl_loss = float(trainer.compute_loss(trainer.model, trl_batch))

    tokenizer, template = load_tokenizer(policy), ChatTemplate.for_checkpoint(policy)
    examples = [tokenize_segments(tokenizer, sft_segments(Record(f"r{i}", r), template)) for i, r in enumerate(records)]
    source = SFTSource(examples, examples[:1], seq_len=64, pad_id=tokenizer.pad_token_id, seed=0, packing=False)
    input_ids, labels = source.batch(source.train_rows)
    width = trl_batch["input_ids"].shape[1]
    assert torch.equal(input_ids[:, :width], trl_batch["input_ids"])
    assert torch.equal(labels[:, :width], trl_batch["labels"])
    model = HybridLM.from_pretrained(policy).train()
    loss, _ = NextTokenLoss(aux_loss_coef=0.0)(model, (input_ids, labels))
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
