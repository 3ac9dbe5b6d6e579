"""The chat template: how chat messages become one prompt, shared by ``serve`` (to answer) and post-training
(``sft``/``dpo``, to learn to answer), so a model is trained on exactly the text it is later served.

The default: each message becomes ``<|role|>\\n{content}\\n`` (role: system, user or assistant), and a prompt
for a reply ends with ``<|assistant|>\\n``. Generation also stops at ``\\n<|user|>``, so a model that goes on to
write the next turn is cut there. A checkpoint's ``chat_template.json`` may override the three strings:
``{"message": "<|{role}|>\\n{content}\\n", "generation_prompt": "<|assistant|>\\n", "stop": ["\\n<|user|>"]}``.

In training, an assistant message is written as the generation prompt (not trained: the model is given it)
followed by its content and the message's closing text (trained: the model must write them, and the tokenizer's
end-of-sequence token after the last one, to stop).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = "chat_template.json"
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A message list the template cannot render; ``field`` names the offending part (``messages[2].role``)."""

    def __init__(self, message: str, field: str = "messages") -> None:
        super().__init__(message)
        self.field = field


@dataclass
class ChatTemplate:
    """How chat messages become one prompt; see the module docstring."""

    message: str = "<|{role}|>\n{content}\n"
    generation_prompt: str = "<|assistant|>\n"
    stop: list[str] = field(default_factory=lambda: ["\n<|user|>"])

    ROLES = ROLES

    def __post_init__(self) -> None:
        if not isinstance(self.message, str) or self.message.count("{content}") != 1:
            raise ValueError(f"chat template: message must hold {{content}} once, got {self.message!r}")
        if not isinstance(self.generation_prompt, str):
            raise ValueError(f"chat template: generation_prompt must be a string, got {self.generation_prompt!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"chat template: stop must be a list of non-empty strings, got {self.stop!r}")

    @classmethod
    def for_checkpoint(cls, path: str | Path | None) -> ChatTemplate:
        """The checkpoint's ``chat_template.json`` when it has one, else the default."""
        file = None if path is None else Path(path) / FILE_NAME
        if file is None or not file.is_file():
            return cls()
        data = json.loads(file.read_text())
        unknown = set(data) - {"message", "generation_prompt", "stop"}
        if unknown:
            raise ValueError(f"{file}: unknown keys {sorted(unknown)}; expected message, generation_prompt, stop")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps({"message": self.message, "generation_prompt": self.generation_prompt,
                           "stop": self.stop}, indent=2) + "\n"

    def render(self, messages: Any) -> str:
        """The prompt for the reply to ``messages``: every message, then the generation prompt."""
        return "".join(text for text, _ in self.segments(messages, train=False)) + self.generation_prompt

    def segments(self, messages: Any, train: bool = True) -> list[tuple[str, bool]]:
        """``messages`` as consecutive (text, is_assistant_output) pieces. With ``train``, an assistant message
        is its generation prompt (False) then its content and closing (True); else every message is one piece."""
        if not isinstance(messages, list) or not messages:
            raise ChatFormatError("messages: expected a non-empty list of {role, content} objects")
        opening, closing = self.message.split("{content}")
        out = []
        for i, message in enumerate(messages):
            role, content = self._checked(message, i)
            if train and role == "assistant":
                out += [(self.generation_prompt, False), (content + closing.format(role=role), True)]
            else:
                out.append((self.message.format(role=role, content=content), False))
        return out

    def _checked(self, message: Any, i: int) -> tuple[str, str]:
        role, content = message_text(message, i)
        for marker in self.markers():  # else a user could write a system turn into its own message
            if marker in content:
                raise ChatFormatError(f"messages[{i}].content: contains the chat template's marker {marker!r}, "
                                      f"which only the template may write", f"messages[{i}].content")
        return role, content

    def markers(self) -> list[str]:
        """What the template writes around a message (each role's opening, the generation prompt), stripped of
        surrounding whitespace: text a message's content may not contain."""
        opening = self.message.split("{content}")[0]
        found = {opening.format(role=role).strip() for role in ROLES} | {self.generation_prompt.strip()}
        found |= {stop.strip() for stop in self.stop}
        return sorted(m for m in found if m)


def message_text(message: Any, i: int) -> tuple[str, str]:
    """``messages[i]`` as (role, content text), whatever the template: the checks every template makes of a
    message's shape (an object, a known role, text content). A template adds its own (``ChatTemplate.render``
    refuses content holding its markers)."""
    if not isinstance(message, dict):
        raise ChatFormatError(f"messages[{i}]: expected an object, got {type(message).__name__}", f"messages[{i}]")
    role = message.get("role")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    if role not in ROLES:
        raise ChatFormatError(f"messages[{i}].role: expected one of {list(ROLES)}, got {role!r}",
                              f"messages[{i}].role")
    return role, _content_text(message.get("content"), i)


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ChatFormatError(f"messages[{i}].content: expected a string or a list of text parts",
                          f"messages[{i}].content")
