"""What a bench run measures: ``BenchSettings``, shared by the runner and the peers' child processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_PRESETS = ("llama-130m", "mamba-130m", "mamba2-130m", "jamba-130m")


@dataclass
class BenchSettings:
    presets: tuple[str, ...] = DEFAULT_PRESETS
    peers: tuple[str, ...] = ()
    threads: int = 2
    prefill_lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    decode_contexts: tuple[int, ...] = (512, 2048, 8192, 32768, 65536)
    train_length: int = 512  # 0: no forward+backward step
    decode_tokens: int = 8  # timed decode steps per repeat
    repeats: int = 3
    budget_s: float = 120.0  # per subject and preset
    scan: bool = True  # the isolated selective scan against its exp bound
    rounds: int = 1  # times ours and the peers are measured in turn, per preset (figures: median over rounds)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (without ``extra``); ``from_dict`` reads them back."""
        return {k: v for k, v in self.__dict__.items() if k != "extra"}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
