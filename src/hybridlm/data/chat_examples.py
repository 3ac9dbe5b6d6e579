"""TRL's dataset formats as token ids: SFT examples (ids, which are trained) and preference pairs.

SFT: ``{"messages": [...]}`` (the assistant turns are trained), ``{"prompt", "completion"}`` (strings, or lists
of messages: the completion is trained) or ``{"text"}`` (all of it is trained). Preference: ``{"prompt", "chosen",
"rejected"}``, strings or conversational, or without ``prompt`` (the implicit form: the shared beginning of
``chosen`` and ``rejected`` is the prompt). Every trained completion ends with the tokenizer's end-of-sequence
token, so the model learns to stop; every sequence starts with its beginning-of-sequence token, as ``serve``
encodes prompts.

Tokenizing: each piece is tokenized with everything before it (``prompt + completion``, as TRL does), and a
piece's tokens are those after the common prefix with the tokens so far, so a tokenizer that merges across
the boundary gives the tokens it gives the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybridlm.chat_template import ChatFormatError, ChatTemplate
from hybridlm.data.records import Record, RecordError

Segments = list[tuple[str, bool]]  # consecutive (text, trained) pieces


@dataclass(frozen=True)
class SFTExample:
    ids: list[int]
    trained: list[bool]  # per token: whether the loss scores predicting it


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[int]
    chosen: list[int]  # the completion tokens only
    rejected: list[int]


def sft_segments(record: Record, template: ChatTemplate) -> Segments:
    """The pieces of an SFT record (see the module docstring)."""
    f = record.fields
    if "messages" in f:
        segments = _chat(record, "messages", template, train=True)
        if not any(trained for _, trained in segments):
            raise record.error("messages", "has no assistant message: nothing to train on")
        return segments
    if "prompt" in f or "completion" in f:
        prompt, completion = _text_or_chat(record, "prompt", template), _completion(record, "completion", template)
        return [(prompt, False), (completion, True)]
    if "text" in f:
        return [(_string(record, "text"), True)]
    raise RecordError(f"{record.where}: expected the fields messages, prompt + completion, or text; "
                      f"got {sorted(f)}")


def preference_texts(record: Record, template: ChatTemplate) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of a preference record (see the module docstring)."""
    f = record.fields
    for name in ("chosen", "rejected"):
        if name not in f:
            raise RecordError(f"{record.where}: expected the fields prompt (optional), chosen and rejected; "
                              f"got {sorted(f)}")
    if "prompt" not in f:
        return _implicit_prompt(record, template)
    return (_text_or_chat(record, "prompt", template), _completion(record, "chosen", template),
            _completion(record, "rejected", template))


def tokenize_segments(tokenizer: Any, segments: Segments) -> SFTExample:
    """Token ids of the pieces, which of them are trained, and the end token after the last trained piece."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos = [] if bos_id is None else [bos_id]
    ids, trained = list(bos), [False] * len(bos)
    text = ""
    for piece, is_trained in segments:
        text += piece
        whole = bos + tokenizer.encode(text)
        keep = _common_prefix(ids, whole)
        ids, trained = whole, trained[:keep] + [is_trained] * (len(whole) - keep)
    if getattr(tokenizer, "eos_token_id", None) is not None and any(trained):
        ids, trained = ids + [tokenizer.eos_token_id], trained + [True]
    return SFTExample(ids, trained)


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> PreferencePair:
    """Prompt and completion tokens; the prompt is the tokens both completions share with it (TRL's split)."""
    with_chosen = tokenize_segments(tokenizer, [(prompt, False), (chosen, True)])
    with_rejected = tokenize_segments(tokenizer, [(prompt, False), (rejected, True)])
    start = min(with_chosen.trained.index(True) if any(with_chosen.trained) else len(with_chosen.ids),
                with_rejected.trained.index(True) if any(with_rejected.trained) else len(with_rejected.ids))
    return PreferencePair(with_chosen.ids[:start], with_chosen.ids[start:], with_rejected.ids[start:])


# ----------------------------------------------------------------------------------------- fields
def _string(record: Record, name: str) -> str:
    value = record.fields[name]
    if not isinstance(value, str) or not value:
        raise record.error(name, f"expected a non-empty string, got {_shown(value)}")
    return value


def _chat(record: Record, name: str, template: ChatTemplate, train: bool) -> Segments:
    try:
        return template.segments(record.fields[name], train=train)
    except ChatFormatError as e:
        raise RecordError(f"{record.where}: field {name!r}: {e}") from None


def _text_or_chat(record: Record, name: str, template: ChatTemplate) -> str:
    """A prompt: a string as it is, a message list rendered with the generation prompt after it."""
    if name not in record.fields:
        raise record.error(name, "missing")
    if isinstance(record.fields[name], list):
        return "".join(t for t, _ in _chat(record, name, template, train=False)) + template.generation_prompt
    return _string(record, name)


def _completion(record: Record, name: str, template: ChatTemplate) -> str:
    """A completion: a string as it is, or messages written as the model writes them after the prompt."""
    if name not in record.fields:
        raise record.error(name, "missing")
    if not isinstance(record.fields[name], list):
        return _string(record, name)
    segments = _chat(record, name, template, train=True)
    if segments and segments[0] == (template.generation_prompt, False):
        segments = segments[1:]  # the prompt already ends with it
    return "".join(t for t, _ in segments)


def _implicit_prompt(record: Record, template: ChatTemplate) -> tuple[str, str, str]:
    chosen, rejected = record.fields["chosen"], record.fields["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise record.error("chosen", "shares no leading message with 'rejected': give a 'prompt' field")
        fake = Record(record.where, {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]})
        return preference_texts(fake, template)
    chosen, rejected = _string(record, "chosen"), _string(record, "rejected")
    n = _common_prefix(chosen, rejected)
    while n > 0 and not chosen[n - 1].isspace():  # cut at a word boundary; the space goes with the completion
        n -= 1
    n = len(chosen[:n].rstrip())
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise record.error("chosen", "and 'rejected' share no prompt followed by two different completions: "
                           "give a 'prompt' field")
    return chosen[:n], chosen[n:], rejected[n:]


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
