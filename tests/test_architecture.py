"""The shape of the house: imports point one way (the import-linter contracts in pyproject.toml), no module is part
of an import cycle, and a deliberate upward import is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import torch
from torch import nn

from hybridlm import HybridLM, ModelConfig
from hybridlm.bench.runner import prefill_work
from hybridlm.config import invalid
from hybridlm.describe import describe, format_description
from hybridlm.layers import register_mixer, unregister_mixer

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    return subprocess.run([exe, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_are_kept():
    result = _lint_imports(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout, result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    # A kernel module that reaches up to the model, even lazily inside a function, must fail the check.
    shutil.copytree(ROOT / "src" / "hybridlm", tmp_path / "src" / "hybridlm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    dispatch = tmp_path / "src" / "hybridlm" / "ops" / "dispatch.py"
    dispatch.write_text(dispatch.read_text() + "\n\ndef _upward():\n    from hybridlm.model import HybridLM\n\n"
                        "    return HybridLM\n")
    result = _lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "hybridlm.ops.dispatch -> hybridlm.model" in result.stdout, result.stdout


def test_no_module_is_part_of_an_import_cycle():
    graph = grimp.build_graph("hybridlm", exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            path = graph.find_shortest_chain(importer=imported, imported=module)
            if path:
                cycles.append(" -> ".join((module, *path)))
    assert not cycles, "\n".join(cycles)


# ------------------------------------------------------------------------------------------- adding a mixer
# A mixer added the way docs/architecture.md says: one class (here, in the test) and one registration. A causal
# exponential moving average of a projection, h_t = a h_{t-1} + (1 - a) W_in x_t, y_t = W_out h_t, with its own
# option ``decay`` (a) under config.mixer_options.
class EMAState:
    description = "EMA state (fixed size)"
    bound_tensors = ()
    length = 0

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h  # (b, d_model)

    def nbytes(self) -> int:
        return self.h.nbytes

    def nbytes_at(self, context: int) -> int:
        return self.nbytes()

    def select(self, rows: torch.Tensor, capacity: int = 0) -> EMAState:
        return EMAState(self.h[rows])

    @staticmethod
    def cat(states: list[EMAState], capacity: int = 0) -> EMAState:
        return EMAState(torch.cat([s.h for s in states]))


class EMA(nn.Module):
    kind = "ema"
    label = "moving average"
    semantic_fields = ()

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.decay = config.mixer_options.get(config.layers[layer_idx], {}).get("decay", 0.9)
        self.in_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    @staticmethod
    def check_config(config: ModelConfig, letter: str) -> None:
        options = config.mixer_options.get(letter, {})
        if set(options) - {"decay"}:
            raise invalid("mixer_options", f"for {letter!r} only 'decay'", options)
        decay = options.get("decay", 0.9)
        if not (isinstance(decay, float) and 0 < decay < 1):
            raise invalid("mixer_options", f"{letter!r}: a decay in (0, 1)", decay)

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int = 0) -> EMAState:
        return EMAState(torch.zeros(batch_size, self.in_proj.in_features, device=device,
                                    dtype=dtype or self.in_proj.weight.dtype))

    def forward(self, x: torch.Tensor, state: EMAState | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x: (b, l, d) -> (b, l, d); padding (mask False) leaves the average as it was
        u = self.in_proj(x)
        h = x.new_zeros(x.shape[0], x.shape[2]) if state is None else state.h
        ys = []
        for t in range(x.shape[1]):
            new = self.decay * h + (1 - self.decay) * u[:, t]
            h = new if mask is None else torch.where(mask[:, t, None], new, h)
            ys.append(h)
        if state is not None:
            state.h = h
        return self.out_proj(torch.stack(ys, 1))

    def step(self, x: torch.Tensor, state: EMAState) -> torch.Tensor:
        # x: (b, 1, d) -> (b, 1, d)
        state.h = self.decay * state.h + (1 - self.decay) * self.in_proj(x[:, 0])
        return self.out_proj(state.h)[:, None]

    def prefill_work(self, length: int) -> tuple[float, float]:
        return 3.0 * self.in_proj.in_features, 0.0


@pytest.fixture
def ema_letter():
    register_mixer("T", EMA)
    yield "T"
    unregister_mixer("T")


def test_a_mixer_added_in_one_file_and_one_line_runs_everywhere(ema_letter, tmp_path):
    config = ModelConfig(d_model=32, n_layers=2, layers="TA", n_heads=2, d_ff=64, mixer_options={"T": {"decay": 0.5}})
    assert config.family == "hybrid"
    torch.manual_seed(0)
    model = HybridLM(config).eval()
    assert isinstance(model.layers[0].mixer, EMA) and model.layers[0].mixer.decay == 0.5
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        state = model.init_state(2)
        model(ids[:, :5], state=state)  # prefill, then the decode path (bound attention, the EMA's torch step)
        steps = [model(ids[:, t:t + 1], state=state).logits for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], atol=1e-5, rtol=1e-4)
    assert state.fused_decode is not None and state.fused_decode.steps[0] is None  # the EMA has no bound kernel
    assert set(state.nbytes()) == {"ema", "attention"}

    text = format_description(describe(config, context=1024, dtype="fp32"))
    assert "T moving average" in text and "EMA state (fixed size)" in text
    flops, _ = prefill_work(model, 64)
    assert flops > 2 * model.num_parameters(active=True) - 2 * config.padded_vocab_size * config.d_model

    model.save_pretrained(tmp_path / "ckpt")
    again = HybridLM.from_pretrained(tmp_path / "ckpt").eval()
    assert again.config == config
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, full, atol=0, rtol=0)


def test_a_mixers_own_options_are_checked_with_the_config(ema_letter):
    with pytest.raises(ValueError, match=r"ModelConfig.mixer_options: expected 'T': a decay in \(0, 1\), got 1.5"):
        ModelConfig(d_model=32, n_layers=1, layers="T", mixer_options={"T": {"decay": 1.5}})
    with pytest.raises(ValueError, match="ModelConfig.mixer_options: expected options of the mixers in layers"):
        ModelConfig(d_model=32, n_layers=1, layers="T", mixer_options={"A": {"x": 1}})


def test_an_unregistered_letter_is_refused_after_unregistering(ema_letter):
    unregister_mixer("T")
    with pytest.raises(ValueError, match="ModelConfig.layers: expected letters from"):
        ModelConfig(d_model=32, n_layers=1, layers="T")
    register_mixer("T", EMA)  # for the fixture's teardown
