"""Speed and memory against context length, ours and peers side by side (``hybridlm bench``).

``run(BenchSettings(...))`` measures; ``format_report`` prints tables with our/peer ratios and the physical
bounds (decode: bytes read per token / measured read bandwidth; prefill: FLOPs / measured matmul rate plus
the scans' exps / measured exp rate); ``write_json`` and ``save_plots`` keep the results.
"""

from hybridlm.bench.report import format_report, save_plots, write_json
from hybridlm.bench.runner import run
from hybridlm.bench.settings import DEFAULT_PRESETS, BenchSettings

__all__ = ["DEFAULT_PRESETS", "BenchSettings", "format_report", "run", "save_plots", "write_json"]
