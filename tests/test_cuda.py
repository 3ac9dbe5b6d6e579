"""The library on a CUDA device: the same numbers as on the CPU, decode with the state on the GPU, training.

Marked ``cuda`` and kept out of the default run (CI has no GPU); run on a GPU machine with
``python -m pytest -m cuda tests/test_cuda.py``. Without the official ``mamba_ssm`` package the dispatch takes
the portable torch backends there (the reference scan, the chunked SSD, SDPA), which is what these check.
"""

import numpy as np
import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.data.source import TaskSource
from hybridlm.data.tasks import get_task
from hybridlm.train import TrainConfig, train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PRESETS = ["llama-tiny", "mamba-tiny", "mamba2-tiny", "jamba-tiny"]


@pytest.fixture(autouse=True)
def _exact_float32():
    # TF32 (cuDNN's default for convolutions) would round float32 products to 10 mantissa bits.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _pair(preset: str) -> tuple[HybridLM, HybridLM]:
    torch.manual_seed(0)
    cpu = HybridLM(ModelConfig.preset(preset)).eval()
    gpu = HybridLM(ModelConfig.preset(preset)).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_and_gradients_equal_the_cpu(preset):
    cpu, gpu = _pair(preset)
    ids = torch.randint(0, cpu.config.vocab_size, (2, 37))
    out_cpu = cpu(ids, labels=ids)
    out_gpu = gpu(ids.cuda(), labels=ids.cuda())
    torch.testing.assert_close(out_gpu.logits.cpu(), out_cpu.logits, atol=1e-4, rtol=1e-3)
    (out_cpu.loss + out_cpu.aux_loss).backward()
    (out_gpu.loss + out_gpu.aux_loss).backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_prefill_then_decode_on_the_gpu_equals_the_cpu(preset):
    cpu, gpu = _pair(preset)
    ids = torch.randint(0, cpu.config.vocab_size, (2, 20))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the prompt
    states = cpu.init_state(2, max_len=4), gpu.init_state(2, max_len=4)  # small: the KV cache grows on the GPU
    assert all(t.device.type == "cuda" for layer in states[1].layers for t in vars(layer).values()
               if isinstance(t, torch.Tensor))
    for model, state, device in ((cpu, states[0], "cpu"), (gpu, states[1], "cuda")):
        model(ids[:, :12].to(device), state=state, attention_mask=mask.to(device))
    for t in range(12, 20):
        expected = cpu(ids[:, t:t + 1], state=states[0]).logits
        got = gpu(ids[:, t:t + 1].cuda(), state=states[1]).logits
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_bfloat16_generation_runs_on_the_gpu(preset):
    model = HybridLM(ModelConfig.preset(preset)).eval().cuda().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), device="cuda")
    out = model.generate(ids, max_new_tokens=6)
    assert out.shape == (2, 15) and out.device.type == "cuda"
    assert torch.isfinite(model(out).logits.float()).all()


def test_training_on_the_gpu_with_bf16_autocast(tmp_path):
    task = get_task("induction_heads")
    config = ModelConfig(vocab_size=16, d_model=32, n_layers=3, layers="SMA", mamba2_d_state=8, mamba2_headdim=16,
                         mamba2_chunk_size=8, n_heads=2)
    result = train(config, TrainConfig(steps=30, batch_size=8, seq_len=40, bf16=True, lr=3e-3, warmup_steps=3,
                                       log_every=5, eval_every=0),
                   TaskSource(task, 40), tmp_path, progress=False, device="cuda")
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    reloaded = HybridLM.from_pretrained(tmp_path / "checkpoint", device="cuda")
    assert next(reloaded.parameters()).device.type == "cuda"
