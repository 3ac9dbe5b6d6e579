"""Preference pairs from Python code whose chosen completion has a property a program checks: it completes the
prompt's last line into a Python statement. Made from the default corpus (the standard library's sources) or any
Python files, offline. A pair is a one-line statement cut at a token boundary at or before its last closing
bracket, as a code completion would be asked for it mid-line:

    prompt    the few lines before the statement, then its line up to the cut: "...\\n        self._buffer.app"
    chosen    the rest of the true line:                                       "end(data)\\n"
    rejected  the same, its last bracket gone:                                 "end(data\\n"
              or, for half the pairs, doubled:                                 "end(data))\\n"

``completes_statement(prompt, completion)`` is the check; it reads a completion as the model writes it (up to its
first newline), so the same test scores the model's own greedy continuations of a prompt, before and after
preference training. Only lines that are a logical line of their own (per ``tokenize``: not inside brackets, not
part of a multi-line string) and contain a closing bracket become pairs, so the true line is a statement in its
context and the corruption always applies; deleting a closing bracket token leaves an opener unclosed and
doubling one closes a bracket never opened, so the rejected line never parses. The builder asserts both. Both
corruptions, half each, because with deletions alone the cheapest way to prefer the chosen lines is to write more
closing brackets everywhere: a DPO run did that and its generations parsed less often than before.
"""

from __future__ import annotations

import ast
import io
import random
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLOSERS = frozenset(")]}")
# A clause header ("else:", "except E:") parses only after the statement it continues; one of these does.
_OPENERS = ("", "if 1: pass\n", "try: pass\n")


@dataclass(frozen=True)
class StatementPair:
    """One preference pair: ``chosen`` completes ``prompt``'s last line into a statement, ``rejected`` does not."""

    prompt: str
    chosen: str
    rejected: str
    where: str  # "file.py:123", the chosen line's place in the corpus

    def record(self) -> dict[str, str]:
        """The pair as a TRL preference record ({"prompt", "chosen", "rejected"})."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def first_line(completion: str) -> str | None:
    """The completion up to its first newline, or None when it has none (it never finished its line)."""
    end = completion.find("\n")
    return None if end < 0 else completion[:end]


def is_statement(completion: str) -> bool:
    """Whether the completion's first line (up to its newline) is one complete Python statement, or the
    header of a compound one (``for x in y:``, ``else:``): it parses on its own once dedented. A completion
    with no newline, an empty line and a comment alone do not count."""
    line = first_line(completion)
    if line is None:
        return False
    code = line.strip()
    if not code or code.startswith("#"):
        return False
    # A header needs a body to parse: give it `pass` (a trailing comment would swallow it, so a newline too).
    # It never closes a bracket, so an unclosed one still fails.
    candidates = [code] + [f"{opener}{code}\n pass" for opener in _OPENERS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in generated text warn; they still parse
        for candidate in candidates:
            try:
                ast.parse(candidate)
            except (SyntaxError, ValueError):  # ValueError: a null byte in generated text
                continue
            return True
    return False


def completes_statement(prompt: str, completion: str) -> bool:
    """Whether ``completion``, after the prompt's last (partial) line, makes that line a statement."""
    return is_statement(prompt.rsplit("\n", 1)[-1] + completion)


def token_columns(line: str) -> list[tuple[int, str]]:
    """(column in ``line``, text) of the Python tokens of one line, strings and comments whole; [] if it has none
    or tokenize cannot read it."""
    indent = len(line) - len(line.lstrip())
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    return [(t.start[1] + indent, t.string) for t in tokens if t.string.strip() and t.type != tokenize.ENDMARKER]


def last_closer_column(line: str) -> int | None:
    """The column of the line's last closing-bracket token (outside strings and comments), None if it has none."""
    closers = [column for column, text in token_columns(line) if text in CLOSERS]
    return closers[-1] if closers else None


def corrupt_last_closer(line: str, double: bool = False) -> str | None:
    """``line`` without its last closing-bracket token (one outside strings and comments), or with that token
    doubled, or None if it has none."""
    column = last_closer_column(line)
    if column is None:
        return None
    return line[:column + 1] + line[column:] if double else line[:column] + line[column + 1:]


def _statement_lines(text: str) -> list[int]:
    """0-based numbers of the lines that are a whole logical line on their own (one-line statements and
    headers), found with ``tokenize``: a NEWLINE token on the same line as the logical line's first token."""
    rows: list[int] = []
    start: int | None = None
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
                continue
            if token.type == tokenize.NEWLINE:
                if start is not None and token.start[0] == start:
                    rows.append(start - 1)
                start = None
            elif start is None:
                start = token.start[0]
    except (tokenize.TokenError, SyntaxError):  # a file tokenize cannot read to its end: keep what it read
        pass
    return rows


def _file_pairs(path: Path, context_lines: int, max_line_chars: int, max_prompt_chars: int,
                rng: random.Random) -> list[StatementPair]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    pairs = []
    for row in _statement_lines(text):
        if row == 0 or row >= len(lines):
            continue
        chosen = lines[row] if lines[row].endswith("\n") else lines[row] + "\n"
        body = chosen.rstrip("\n")
        if len(body.strip()) > max_line_chars or "\r" in body or not is_statement(chosen):
            continue
        closer = last_closer_column(body)
        if closer is None:
            continue
        rejected = corrupt_last_closer(body, double=rng.random() < 0.5) + "\n"
        # The cut: a token's start, after the line's first token and at most at the last closer, so the prompt
        # shows how the line begins and the completion holds the bracket in question.
        cut = rng.choice([column for column, _ in token_columns(body)[1:] if column <= closer])
        context = "".join(lines[max(0, row - context_lines): row])[-max_prompt_chars:]
        if not context.strip():
            continue
        pairs.append(StatementPair(context + body[:cut], chosen[cut:], rejected[cut:], f"{path.name}:{row + 1}"))
    return pairs


def statement_pairs(files: list[Path], n_train: int, n_eval: int, seed: int = 0, context_lines: int = 4,
                    max_line_chars: int = 60, max_prompt_chars: int = 200, per_file: int = 20
                    ) -> tuple[list[StatementPair], list[StatementPair]]:
    """``n_train`` training and ``n_eval`` held-out pairs from ``files``, the same for the same arguments.

    The files are shuffled with ``seed``; held-out pairs come from the first files, training pairs from the
    others, so no held-out prompt is seen in training. At most ``per_file`` pairs (drawn with ``seed``) come
    from one file, so many files contribute. ``context_lines``: the lines before the statement in the prompt
    (cut to its last ``max_prompt_chars`` characters); ``max_line_chars``: the longest statement kept."""
    for name, value in (("n_train", n_train), ("n_eval", n_eval), ("context_lines", context_lines),
                        ("max_line_chars", max_line_chars), ("max_prompt_chars", max_prompt_chars),
                        ("per_file", per_file)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if not files:
        raise ValueError("files: none given (expected Python source files, e.g. data.corpus.default_corpus_files())")
    rng = random.Random(seed)
    order = sorted(Path(f) for f in files)
    rng.shuffle(order)
    held_out: list[StatementPair] = []
    train: list[StatementPair] = []
    for path in order:
        if len(held_out) >= n_eval and len(train) >= n_train:
            break
        found = _file_pairs(path, context_lines, max_line_chars, max_prompt_chars, rng)
        found = rng.sample(found, min(per_file, len(found)))
        # The held-out set fills first, file by file: a file's pairs all go to one side.
        if len(held_out) < n_eval:
            held_out.extend(found[: n_eval - len(held_out)])
        else:
            train.extend(found[: n_train - len(train)])
    if len(held_out) < n_eval or len(train) < n_train:
        raise ValueError(f"files: {len(order)} file(s) give {len(held_out)} held-out and {len(train)} training "
                         f"pairs, fewer than the {n_eval} and {n_train} asked for (a pair needs a one-line Python "
                         f"statement with a closing bracket, at most {max_line_chars} characters, after a line)")
    for pair in held_out + train:
        assert completes_statement(pair.prompt, pair.chosen), pair
        assert not completes_statement(pair.prompt, pair.rejected), pair
    return train, held_out


def describe(pairs: list[StatementPair]) -> dict[str, Any]:
    """Counts for a report: pairs, distinct source files, mean prompt and completion lengths in characters."""
    n = max(1, len(pairs))
    return {"pairs": len(pairs), "files": len({p.where.rsplit(":", 1)[0] for p in pairs}),
            "mean_prompt_chars": sum(len(p.prompt) for p in pairs) / n,
            "mean_chosen_chars": sum(len(p.chosen) for p in pairs) / n}
