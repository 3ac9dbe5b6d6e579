"""Audit log: one JSON line per request (served or refused), rotated by size, queryable.

Each record holds ``time`` (UTC, ISO 8601), ``request_id``, ``method``, ``path``, ``endpoint``, ``principal``,
``role``, ``auth`` (how the caller was identified), ``client``, ``model``, ``prompt``, ``output``, ``prompt_tokens``,
``completion_tokens``, ``latency_ms``, ``status`` (HTTP status; 499 when the client went away mid-stream),
``finish_reason`` and ``error``; a request to a composition of experts adds ``expert`` (the one that answered),
``routed_expert``, ``confidence`` and ``fell_back``. Credentials are never written: the server never passes the
Authorization header here. A generation request is written twice: when it is admitted (with ``"admitted": true`` and
no status yet) and when it ends; ``query`` shows the admission only for a request that never ended (the server died
first), so every admitted request stays visible and each request reads as one record.

A caller decides what a prompt holds, so no caller may decide what the log loses:

- ``prompt`` and ``output`` are stored whole up to ``max_field_bytes`` (16 KiB) of JSON each; a longer one is stored
  as ``{"truncated": <its first max_field_bytes characters>, "bytes": <its full size>, "sha256": <of all of it>}``,
  so a record's size is bounded and the whole can still be matched against a copy.
- A torn last line (a crash mid-write) is moved to ``FILE.torn-<time>`` when the log is opened, never appended to.
- When the file would exceed ``max_bytes`` it is renamed ``FILE.1`` (``FILE.1`` to ``FILE.2``, ...) and a new file
  is started. Old files beyond ``backups`` are deleted only once older than ``keep_seconds`` (7 days): a flood of
  requests can make the log take more files, never make it drop recent ones. Rotation keeps by age, not by count
  alone; the disk it may take during a flood is bounded by what the server admits (its queue and limits).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hybridlm.serve.redaction import Redaction


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends records to ``path`` (thread-safe), rotating by size."""

    def __init__(self, path: str | Path, max_bytes: int = 10_000_000, backups: int = 5,
                 max_field_bytes: int = 16_384, keep_seconds: float = 7 * 86_400,
                 fsync_seconds: float | None = 1.0, redaction: Redaction | None = None,
                 retention_days: float | None = None) -> None:
        if max_bytes < 1024:
            raise ValueError(f"audit max_bytes: expected at least 1024, got {max_bytes!r}")
        if backups < 0:
            raise ValueError(f"audit backups: expected an integer >= 0, got {backups!r}")
        if max_field_bytes < 64:
            raise ValueError(f"audit max_field_bytes: expected at least 64, got {max_field_bytes!r}")
        if keep_seconds < 0:
            raise ValueError(f"audit keep_seconds: expected a number >= 0, got {keep_seconds!r}")
        if fsync_seconds is not None and not 0 <= fsync_seconds < float("inf"):
            raise ValueError(f"audit fsync_seconds: expected a number >= 0 (0: every record) or none, got "
                             f"{fsync_seconds!r}")
        if retention_days is not None and not 0 < retention_days < float("inf"):
            raise ValueError(f"audit retention_days: expected a number of days > 0, got {retention_days!r}")
        self.fsync_seconds, self.redaction, self.retention_days = fsync_seconds, redaction, retention_days
        self._sync_timer: threading.Timer | None = None
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.max_field_bytes, self.keep_seconds = max_field_bytes, keep_seconds
        self.torn = self._set_aside_torn_line()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._expire(current=True)

    @classmethod
    def from_config(cls, config: dict[str, Any], path: str | Path | None = None,
                    where: str = "[audit]") -> AuditLog:
        """The log an auth file's ``[audit]`` table describes (``path`` overrides its path); an unknown or
        ill-typed key is an error naming it. ``fsync_seconds = "never"`` leaves syncing to the kernel."""
        known = {"path", "max_bytes", "backups", "max_field_bytes", "keep_seconds", "fsync_seconds", "redact",
                 "retention_days"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        kwargs: dict[str, Any] = {}
        if "redact" in config:
            kwargs["redaction"] = Redaction.from_config(config["redact"], f"{where}.redact")
        for key, kind in (("max_bytes", int), ("backups", int), ("max_field_bytes", int), ("keep_seconds", float),
                          ("fsync_seconds", float), ("retention_days", float)):
            if key not in config:
                continue
            value = config[key]
            if key == "fsync_seconds" and value == "never":
                kwargs[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ValueError(f"{where}.{key}: expected {'an integer' if kind is int else 'a number'}, got "
                                 f"{value!r}")
            kwargs[key] = kind(value)
        return cls(path or config.get("path", "hybridlm-audit.jsonl"), **kwargs)

    def write(self, record: dict[str, Any]) -> None:
        if self.redaction is not None and self.redaction.active:  # before anything is serialised
            record = {**record, **{k: self.redaction.apply(record[k]) for k in ("prompt", "output") if k in record}}
            if isinstance(record.get("error"), str):
                record["error"] = self.redaction.error(record["error"])
        record = {**record, **{k: self._bounded(record[k]) for k in ("prompt", "output") if k in record}}
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
                if self.fsync_seconds == 0:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if self.fsync_seconds and self._sync_timer is None:
                self._sync_timer = threading.Timer(self.fsync_seconds, self.sync)
                self._sync_timer.daemon = True
                self._sync_timer.start()

    def sync(self) -> None:
        """fsync the current file now (the timer's job; also at close and before a rotation)."""
        with self._lock:
            self._sync_locked()

    def close(self) -> None:
        """Make everything written durable; the log may still be written to afterwards."""
        self.sync()

    def _sync_locked(self) -> None:
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self.fsync_seconds is None or not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _set_aside_torn_line(self) -> Path | None:
        """A crash mid-write leaves a last line without its newline; appending to it would glue the next record on
        and lose both. Move that tail to ``FILE.torn-<unix time>`` (kept, for whoever investigates) and cut the log
        back to its last whole line. Returns the file it went to, or None."""
        if not self.path.is_file():
            return None
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return None
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return None
            start = max(0, size - 1_048_576)  # a record is bounded (max_field_bytes): its tail is within 1 MiB
            f.seek(start)
            tail = f.read()
            cut = start + tail.rfind(b"\n") + 1 if b"\n" in tail else start
            f.seek(cut)
            torn = f.read()
            aside = self.path.with_name(f"{self.path.name}.torn-{int(time.time())}")
            aside.write_bytes(torn)
            f.truncate(cut)
        return aside

    def _bounded(self, value: Any) -> Any:
        # a prompt or output as stored: whole when its JSON fits max_field_bytes, else its head, size and hash
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        data = text.encode("utf-8", errors="surrogatepass")
        if len(data) <= self.max_field_bytes:
            return value
        return {"truncated": text[: self.max_field_bytes], "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

    def _rotate(self) -> None:
        # Shift every rotated file up by one (FILE.n -> FILE.n+1, ..., FILE -> FILE.1), then delete those past
        # `backups` that are older than keep_seconds; younger ones stay, however many there are.
        self._sync_locked()  # what is renamed away is durable first
        numbered = sorted((p for p in self.path.parent.glob(f"{self.path.name}.*") if p.suffix[1:].isdigit()),
                          key=lambda p: -int(p.suffix[1:]))
        for older in numbered:
            os.replace(older, self.path.with_name(f"{self.path.name}.{int(older.suffix[1:]) + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        cutoff = time.time() - self.keep_seconds
        for old in self.path.parent.glob(f"{self.path.name}.*"):
            if old.suffix[1:].isdigit() and int(old.suffix[1:]) > self.backups and old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        self._expire(current=False)

    def _expire(self, current: bool) -> None:
        # retention_days: rotated and torn files older than it go, whatever backups and keep_seconds say
        if self.retention_days is None:
            return
        cutoff = time.time() - self.retention_days * 86_400
        old = [p for p in self.path.parent.glob(f"{self.path.name}.*")
               if p.suffix[1:].isdigit() or ".torn-" in p.name]
        if current and self.path.exists():
            old.append(self.path)
        for p in old:
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()


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
    ended = {r.get("request_id") for r in _records(path) if not r.get("admitted")}
    out = []
    for record in _records(path):
        if record.get("admitted") and record.get("request_id") in ended:
            continue  # its final record follows
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
