"""What the audit log may keep of prompts and outputs: a redaction policy applied before anything is written.

Configured in the auth file's ``[audit.redact]`` table::

    [audit.redact]
    builtin = ["email", "phone", "card"]   # built-in patterns, each match stored as "[email]", "[phone]", "[card]"
    patterns = ['ACME-\\d{6}']             # your own regular expressions, each match stored as "[redacted]"
    hashes_only = false                    # true: a prompt or output is stored only as its sha256 and size, and
                                           # the quoted values in an error message as "[value]"

The patterns are deliberately broad (a false positive costs a log reader a few characters; a false negative puts
personal data on disk): ``card`` is 13 to 19 digits in groups separated by spaces or dashes, ``phone`` an optional
``+`` and 7 to 15 digits with the usual separators.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

BUILTIN = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    "card": re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)"),
    "phone": re.compile(r"(?<![\w+])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"),
}
# a quoted value inside a server error message ("messages: got 'bob@x.org'"): what hashes_only removes from errors
QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
# card before phone: a card number also looks like a long phone number, and the more specific label is kept
ORDER = ("email", "card", "phone")


@dataclass(frozen=True)
class Redaction:
    """A redaction policy; ``apply`` turns a prompt or output (a string, or chat messages) into what is stored."""

    builtin: tuple[str, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = field(default=())
    hashes_only: bool = False

    @classmethod
    def from_config(cls, config: Any, where: str = "[audit.redact]") -> Redaction:
        """The policy an ``[audit.redact]`` table describes; a bad key, name or pattern is an error naming it."""
        if not isinstance(config, dict):
            raise ValueError(f"{where}: expected a table, got {config!r}")
        unknown = set(config) - {"builtin", "patterns", "hashes_only"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected builtin, patterns, hashes_only")
        builtin = config.get("builtin", [])
        if not isinstance(builtin, list) or any(b not in BUILTIN for b in builtin):
            raise ValueError(f"{where}.builtin: expected a list of {list(ORDER)}, got {builtin!r}")
        patterns = config.get("patterns", [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"{where}.patterns: expected a list of regular expressions, got {patterns!r}")
        compiled = []
        for i, p in enumerate(patterns):
            try:
                compiled.append(re.compile(p))
            except re.error as e:
                raise ValueError(f"{where}.patterns[{i}]: not a regular expression ({e}): {p!r}") from None
        hashes_only = config.get("hashes_only", False)
        if not isinstance(hashes_only, bool):
            raise ValueError(f"{where}.hashes_only: expected true or false, got {hashes_only!r}")
        return cls(tuple(b for b in ORDER if b in builtin), tuple(compiled), hashes_only)

    @property
    def active(self) -> bool:
        return bool(self.builtin or self.patterns or self.hashes_only)

    def apply(self, value: Any) -> Any:
        """``value`` as the log may store it: with every match replaced, or (hashes only) its sha256 and size."""
        if value is None or not self.active:
            return value
        if self.hashes_only:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            data = text.encode("utf-8", errors="surrogatepass")
            return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        return self._scrub(value)

    def error(self, value: str) -> str:
        """An error message as stored: the patterns applied; with hashes only, every quoted value in it (where
        messages echo what a request sent) replaced by ``[value]``, the message's own words kept."""
        return self.text(QUOTED.sub("[value]", value) if self.hashes_only else value)

    def text(self, value: str) -> str:
        """A string with every match of the policy's patterns replaced."""
        for pattern in self.patterns:  # custom first: they may be more specific than the built-in ones
            value = pattern.sub("[redacted]", value)
        for name in self.builtin:
            value = BUILTIN[name].sub(f"[{name}]", value)
        return value

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self._scrub(v) for v in value]
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        return value
