"""Records of a post-training data file: JSON lines, or Parquet / Arrow through Hugging Face ``datasets``.

A file is read whole before anything uses it, and every record keeps where it came from (``file:line`` or
``file row N``), so an error names the file, the record and the field, and nothing is trained on half a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABULAR = (".parquet", ".arrow")


class RecordError(ValueError):
    """A record that is not what its format needs; the message starts with where it is."""


@dataclass(frozen=True)
class Record:
    where: str  # "data.jsonl:12" or "data.parquet row 12"
    fields: dict[str, Any]

    def error(self, field: str, message: str) -> RecordError:
        return RecordError(f"{self.where}: field {field!r}: {message}")


def read_records(path: str | Path) -> list[Record]:
    """Every record of ``path`` (``.jsonl``/``.json`` lines, ``.parquet`` or ``.arrow``), each a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path} not found (expected a .jsonl, .parquet or .arrow file)")
    records = _read_tabular(path) if path.suffix in TABULAR else _read_json_lines(path)
    if not records:
        raise RecordError(f"{path}: holds no records")
    return records


def _read_json_lines(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(fields, dict):
                raise RecordError(f"{where}: expected a JSON object per line, got {type(fields).__name__}")
            records.append(Record(where, fields))
    return records


def _read_tabular(path: Path) -> list[Record]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"data: reading {path.suffix} files needs Hugging Face `datasets`: "
                          f"pip install 'hybridlm[post]' (or give a .jsonl file)") from e
    table = (datasets.Dataset.from_parquet(str(path), keep_in_memory=True) if path.suffix == ".parquet"
             else datasets.Dataset.from_file(str(path), in_memory=True))
    return [Record(f"{path} row {i}", dict(row)) for i, row in enumerate(table)]
