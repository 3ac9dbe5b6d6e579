"""Run a ``hybridlm`` command in a subprocess, alone or under torchrun; a distributed run must also leave no
process-group threads behind when the command returns (gloo threads still running at interpreter exit aborted a
finished run: "terminate called without an active exception")."""

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """``hybridlm ARGS`` in ``nproc`` processes (torchrun when more than one); asserts it succeeded."""
    here = str(Path(__file__).resolve())
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), here]
                if nproc > 1 else [sys.executable, here])
    # the processes import this checkout's hybridlm, whatever is installed
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-4000:]}"
                                  f"\nstderr:\n{done.stderr[-8000:]}")
    return done


def _threads() -> list[str]:
    tasks = Path("/proc/self/task")
    return [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.is_dir() else []


if __name__ == "__main__":
    from hybridlm.cli import main

    main(sys.argv[1:])
    left = [name for name in _threads() if "gloo" in name]
    if left:
        print(f"process-group threads still running after the command: {left}", file=sys.stderr)
        sys.exit(3)
