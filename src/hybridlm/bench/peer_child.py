"""The child process of ``peer_process``: rebuild the bench's model, measure one peer on it, write the result.

Run as ``python -m hybridlm.bench.peer_child`` with a JSON job on stdin (``peer_process.measure_peer`` does it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hybridlm.bench.peer_process import weights_fingerprint
from hybridlm.bench.runner import measure_subject, set_threads
from hybridlm.bench.settings import BenchSettings
from hybridlm.bench.subjects import build_model, make_peer


def _child(job: dict[str, Any]) -> dict[str, Any]:
    settings = BenchSettings.from_dict(job["settings"])
    set_threads(settings.threads)
    model = build_model(job["preset"])
    if weights_fingerprint(model) != job["fingerprint"]:
        return {"not_measured": "failed: the peer process built different weights than the bench's model"}
    try:
        subject = make_peer(job["peer"], model, settings.threads, job["max_context"])
    except Exception as e:  # not installed, or cannot run this family: reported, never a pass
        return {"not_measured": f"{type(e).__name__}: {e}"[:300]}
    set_threads(settings.threads)  # a peer's import may have changed torch's thread count
    try:
        return {"result": measure_subject(subject, model, settings, is_ours=False)}
    except Exception as e:
        return {"not_measured": f"failed: {type(e).__name__}: {e}"[:300]}


if __name__ == "__main__":
    request = json.load(sys.stdin)
    reply = _child(request)
    Path(request["out"]).write_text(json.dumps(reply))
