"""Audit log: one JSON line per request (served or refused), rotated by size, queryable.

Each record holds ``time`` (UTC, ISO 8601), ``request_id``, ``method``, ``path``, ``endpoint``,
``principal``, ``role``, ``auth`` (how the caller was identified), ``client``, ``model``, ``prompt``,
``output``, ``prompt_tokens``, ``completion_tokens``, ``latency_ms``, ``status`` (HTTP status; 499 when the
client went away mid-stream), ``finish_reason`` and ``error``. Credentials are never written: the server
never passes the Authorization header here.

When the file would exceed ``max_bytes`` it is renamed ``FILE.1`` (``FILE.1`` to ``FILE.2``, ...; at most
``backups`` old files are kept) and a new file is started.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends records to ``path`` (thread-safe), rotating by size."""

    def __init__(self, path: str | Path, max_bytes: int = 10_000_000, backups: int = 5) -> None:
        if max_bytes < 1024:
            raise ValueError(f"audit max_bytes: expected at least 1024, got {max_bytes!r}")
        if backups < 0:
            raise ValueError(f"audit backups: expected an integer >= 0, got {backups!r}")
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        try:
            line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate somewhere: escaped, the line stays valid UTF-8 and JSON
            line = (json.dumps(record, ensure_ascii=True, default=str) + "\n").encode("ascii")
        with self._lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(line) > self.max_bytes:
                self._rotate()
            # O_APPEND: each record is one write, whole lines even if another process appends too.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def log_files(path: str | Path) -> list[Path]:
    """The log and its rotated files, oldest first."""
    path = Path(path)
    rotated = sorted((p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
                     key=lambda p: -int(p.suffix[1:]))
    return [*rotated, *([path] if path.exists() else [])]


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        t = datetime.fromtimestamp(float(value), timezone.utc)
    except ValueError:
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{name}: expected an ISO 8601 time or Unix seconds, got {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def query(path: str | Path, principal: str | None = None, since: str | None = None, until: str | None = None,
          status: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of the log at ``path`` (rotated files included), oldest first, filtered by ``principal``,
    time range [``since``, ``until``] (ISO 8601 or Unix seconds) and ``status``; the last ``limit`` of them."""
    t0, t1 = _parse_time(since, "since"), _parse_time(until, "until")
    out = []
    for record in _records(path):
        if principal is not None and record.get("principal") != principal:
            continue
        if status is not None and record.get("status") != status:
            continue
        if t0 or t1:
            t = _parse_time(record.get("time"), "time")
            if (t0 and t < t0) or (t1 and t > t1):
                continue
        out.append(record)
    return out[-limit:] if limit else out


def _records(path: str | Path) -> Iterator[dict[str, Any]]:
    for file in log_files(path):
        with open(file, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash mid-write; the rest of the log still counts
