"""Shared pieces of the serve tests: small random models whose next-token distributions depend on the context,
the reference continuation ``model.generate`` gives for a prompt, and reading a served process's output."""

from __future__ import annotations

import dataclasses
import os
import select
import subprocess
import time

import torch

from hybridlm import ByteTokenizer, HybridLM, ModelConfig

TOKENIZER = ByteTokenizer()


def tiny_model(preset: str, seed: int = 0) -> HybridLM:
    """A tiny preset with a large init: peaked distributions (max prob ~0.2), so a sampled token depends on the
    context and a wrong state would show (the default init gives near-uniform ones)."""
    torch.manual_seed(seed)
    return HybridLM(dataclasses.replace(ModelConfig.preset(preset), initializer_range=0.3)).eval()


def reference(model: HybridLM, prompt: str, max_tokens: int, **sampling) -> list[int]:
    """Token ids ``model.generate`` gives after the server's encoding of ``prompt`` (bos + UTF-8 bytes)."""
    ids = torch.tensor([TOKENIZER.encode(prompt, add_bos=True)])
    out = model.generate(ids, max_tokens, eos_token_id=TOKENIZER.eos_token_id, **sampling)
    return out[0, ids.shape[1]:].tolist()


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line of ``proc``'s stdout, waiting at most ``timeout`` seconds."""
    deadline, buf = time.monotonic() + timeout, b""
    fd = proc.stdout.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
            raise AssertionError(f"no line from the server (exit code {proc.poll()}): {proc.stderr.read()!r}"
                                 if proc.poll() is not None else "no line from the server in time")
        if select.select([fd], [], [], min(left, 0.5))[0]:
            chunk = os.read(fd, 1)
            if not chunk:  # end of file: the process closed its stdout, so no line is coming
                proc.wait(10)
                raise AssertionError(f"no line from the server (exit code {proc.poll()}): {proc.stderr.read()!r}")
            buf += chunk
    return buf.decode().strip()
