"""What ``hybridlm sft`` and ``hybridlm dpo`` do: read the starting model (its tokenizer and chat template), the
data in TRL's formats, optionally a LoRA adapter, and call ``train`` with the right source and objective.

The output directory is a ``hybridlm train`` run: ``checkpoint/`` (the whole model in hybridlm's format, or with
``lora`` the adapter alone in peft's format), ``metrics.jsonl``, and with ``merge`` also ``merged/``, the model with
the adapter folded in. Every checkpoint carries the chat template it was trained with, so ``hybridlm serve`` of it
renders chats as training did. Held-out data: ``eval_data``, else the last ``EVAL_FRACTION`` of the records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridlm.chat_template import FILE_NAME as CHAT_TEMPLATE_FILE
from hybridlm.chat_template import ChatTemplate
from hybridlm.data.chat_examples import preference_texts, sft_segments, tokenize_pair, tokenize_segments
from hybridlm.data.preference_source import PreferenceSource
from hybridlm.data.records import Record, read_records
from hybridlm.data.sft_source import SFTSource
from hybridlm.model import HybridLM
from hybridlm.tokenizer import HFTokenizer, load_tokenizer
from hybridlm.train import checkpoint as ckpt
from hybridlm.train.config import TrainConfig
from hybridlm.train.launch import run_dir
from hybridlm.train.lora import LoraSettings, apply_lora, is_adapter, load_adapter, merged
from hybridlm.train.preference import AdapterReference, FrozenReference, PrecomputedReference, PreferenceObjective
from hybridlm.train.preference_losses import PreferenceLoss
from hybridlm.train.trainer import TrainResult, checkpoint_path, train

EVAL_FRACTION = 0.05
MERGED_DIR = "merged"
REFERENCES = ("frozen", "precomputed", "adapter")
# Fine-tuning defaults (a run's explicit settings override them): a short, gentle schedule without weight decay.
SFT_DEFAULTS = {"steps": 200, "lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.0, "batch_size": 8, "seq_len": 512,
                "eval_every": 50, "eval_batches": 50}
DPO_DEFAULTS = {**SFT_DEFAULTS, "lr": 1e-5}
# The preference loss when neither the call nor a resumed run names it (TRL's DPOConfig defaults).
DPO_LOSS_DEFAULTS = {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5,
                     "sft_weight": 0.0}


@dataclass
class Start:
    """The model a post-training run starts from, with what it reads and writes text with."""

    path: Path
    model: HybridLM
    tokenizer: Any
    template: ChatTemplate

    @classmethod
    def load(cls, path: str | Path) -> Start:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model: {path} is not a checkpoint directory")
        return cls(path.resolve(), HybridLM.from_pretrained(path), load_tokenizer(path),
                   ChatTemplate.for_checkpoint(path))

    @property
    def pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id"):
            if getattr(self.tokenizer, name, None) is not None:
                return getattr(self.tokenizer, name)
        return 0


def split_records(data: str | Path, eval_data: str | Path | None) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records: ``eval_data``'s, else the last ``EVAL_FRACTION`` (at least one) of ``data``."""
    records = read_records(data)
    if eval_data is not None:
        return records, read_records(eval_data)
    if len(records) < 2:
        raise ValueError(f"data: {data} has {len(records)} record; give at least 2 (one is held out) or --eval-data")
    n_eval = max(1, math.floor(len(records) * EVAL_FRACTION))
    return records[:-n_eval], records[-n_eval:]


def _settings(defaults: dict[str, Any], given: dict[str, Any] | None, resumed: dict[str, Any] | None) -> TrainConfig:
    given = {k: v for k, v in (given or {}).items() if v is not None}
    return TrainConfig.from_dict({**(resumed or defaults), **given})


def _resumed(resume: str | Path | None) -> dict[str, Any] | None:
    return None if resume is None else ckpt.read_state(checkpoint_path(resume))


def _run(kind: str, model: str | Path | None, data: str | Path | None, out: str | Path | None,
         resume: str | Path | None, eval_data: str | Path | None, lora: LoraSettings | None, options: dict[str, Any]):
    """The starting point, the records and the run description shared by sft and dpo (resumed ones from the
    checkpoint's description, unless given again)."""
    state = _resumed(resume)
    saved = (state or {}).get("post_training", {})
    if state is not None and saved.get("kind") != kind:
        raise ValueError(f"resume: {resume} is not a `hybridlm {kind}` run")
    model = model if model is not None else saved.get("model")
    data = data if data is not None else saved.get("data")
    eval_data = eval_data if eval_data is not None else saved.get("eval_data")
    if lora is None and saved.get("lora"):
        lora = LoraSettings(**{**saved["lora"], "targets": tuple(saved["lora"]["targets"])})
    if model is None or data is None:
        raise ValueError(f"{kind}: give MODEL and --data FILE (or --resume DIR)")
    out = Path(out) if out is not None else run_dir(resume) if resume is not None else Path(f"runs/{kind}")
    start = Start.load(model)
    train_records, eval_records = split_records(data, eval_data)
    description = {"kind": kind, "model": str(start.path), "data": str(Path(data).resolve()),
                   "eval_data": None if eval_data is None else str(Path(eval_data).resolve()),
                   "lora": None if lora is None else lora.to_dict(), **options}
    return start, train_records, eval_records, description, lora, out, state


def _train_with(start: Start, config: TrainConfig, source, out: Path, resume, lora: LoraSettings | None,
                description: dict[str, Any], progress: bool, merge: bool, objective_for) -> TrainResult:
    model: Any = start.model if lora is None else apply_lora(start.model, lora)
    load_model = None if lora is None else (lambda path: load_adapter(Start.load(start.path).model, path,
                                                                       trainable=True))
    objective = objective_for(model)
    result = train(start.model.config, config, source, out, resume=resume,
                   progress=progress, tokenizer=start.tokenizer if isinstance(start.tokenizer, HFTokenizer) else None,
                   extra_state={"post_training": description}, objective=objective, initial_model=model,
                   files={CHAT_TEMPLATE_FILE: start.template.to_json()}, load_model=load_model)
    if merge:
        if not is_adapter(result.model):
            raise ValueError("--merge: only a run with --lora has an adapter to merge")
        target = out / MERGED_DIR
        merged(result.model).save_pretrained(target, tokenizer=start.tokenizer
                                             if isinstance(start.tokenizer, HFTokenizer) else None)
        (target / CHAT_TEMPLATE_FILE).write_text(start.template.to_json())
    return result


def run_sft(model: str | Path | None, data: str | Path | None, out: str | Path | None = None,
            eval_data: str | Path | None = None, packing: bool | None = None, settings: dict[str, Any] | None = None,
            lora: LoraSettings | None = None, merge: bool = False, resume: str | Path | None = None,
            progress: bool = True) -> TrainResult:
    """Supervised fine-tuning of the checkpoint ``model`` on ``data`` (loss on completion tokens only)."""
    start, train_records, eval_records, description, lora, out, state = _run(
        "sft", model, data, out, resume, eval_data, lora, {"packing": bool(packing)})
    if state is not None and packing is None:
        description["packing"] = state["post_training"].get("packing", False)
    config = _settings(SFT_DEFAULTS, settings, None if state is None else state["train_config"])

    def examples(records: list[Record]):
        return [tokenize_segments(start.tokenizer, sft_segments(r, start.template)) for r in records]

    source = SFTSource(examples(train_records), examples(eval_records), config.seq_len, start.pad_id, config.seed,
                       packing=description["packing"], info={"data": description["data"]})
    return _train_with(start, config, source, out, resume, lora, description, progress, merge,
                       lambda m: None)


def run_dpo(model: str | Path | None, data: str | Path | None, out: str | Path | None = None,
            eval_data: str | Path | None = None, loss: str | None = None, beta: float | None = None,
            label_smoothing: float | None = None, simpo_gamma: float | None = None, sft_weight: float | None = None,
            reference: str | None = None, settings: dict[str, Any] | None = None, lora: LoraSettings | None = None,
            merge: bool = False, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Preference optimisation of the checkpoint ``model`` on ``data`` (pairs), with ``loss`` and ``beta``.

    ``reference``: ``frozen`` (a copy of the starting model), ``precomputed`` (its log-probs, computed once) or
    ``adapter`` (with LoRA: the base weights, the adapter disabled; the default with LoRA). ``sft_weight``: adds
    that times the chosen tokens' mean NLL (RPO; 0, the default, is plain DPO). A resumed run keeps the
    loss, its hyperparameters and the reference it was started with, unless given again."""
    start, train_records, eval_records, description, lora, out, state = _run(
        "dpo", model, data, out, resume, eval_data, lora, {})
    saved = (state or {}).get("post_training", {}).get("preference", {})
    given = {"loss": loss, "beta": beta, "label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma,
             "sft_weight": sft_weight, "reference": reference}
    chosen = {k: v if v is not None else saved.get(k, DPO_LOSS_DEFAULTS.get(k)) for k, v in given.items()}
    preference_loss = PreferenceLoss(chosen["loss"], chosen["beta"], chosen["label_smoothing"], chosen["simpo_gamma"],
                                     chosen["sft_weight"])
    reference = chosen["reference"] or ("adapter" if lora is not None else "frozen")
    if reference not in REFERENCES:
        raise ValueError(f"--reference: expected one of {list(REFERENCES)}, got {reference!r}")
    if reference == "adapter" and lora is None:
        raise ValueError("--reference adapter: needs --lora (the reference is the base with the adapter disabled)")
    if not preference_loss.needs_reference:
        reference = None
    description["preference"] = {**chosen, "reference": reference}
    config = _settings(DPO_DEFAULTS, settings, None if state is None else state["train_config"])

    def pairs(records: list[Record]):
        return [tokenize_pair(start.tokenizer, *preference_texts(r, start.template)) for r in records]

    source = PreferenceSource(pairs(train_records), pairs(eval_records), config.seq_len, start.pad_id, config.seed,
                              info={"data": description["data"]})

    def objective_for(policy):
        ref = (None if reference is None else FrozenReference(start.model) if reference == "frozen" else
               AdapterReference(policy) if reference == "adapter" else
               PrecomputedReference(policy, source.all_batches(config.batch_size),
                                    next(policy.parameters()).device))
        return PreferenceObjective(preference_loss, ref, start.model.config.moe_aux_loss_coef, reference)

    return _train_with(start, config, source, out, resume, lora, description, progress, merge, objective_for)
