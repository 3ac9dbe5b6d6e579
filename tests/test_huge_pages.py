"""A CPU model's weights moved into one huge-page mapping: same values and Parameters, same training and decode."""

import mmap
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM, ModelConfig, huge_pages
from hybridlm.generation import generate
from hybridlm.huge_pages import place_parameters

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="huge-page placement is Linux-only")


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0]


def test_huge_page_bytes_are_aligned_and_advised():
    buf = huge_pages.huge_page_bytes(3 * huge_pages.HUGE_PAGE + 5)
    assert buf.numel() == 3 * huge_pages.HUGE_PAGE + 5 and buf.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert not buf.any()
    if _thp_mode() in ("always", "madvise"):  # the mapping holding it is eligible for huge pages
        start = buf.data_ptr()
        eligible = None
        for block in Path("/proc/self/smaps").read_text().split("\n"):
            fields = block.split()
            if fields and "-" in fields[0] and len(fields) >= 5:
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                inside = lo <= start < hi
            elif fields and fields[0] == "THPeligible:" and inside:
                eligible = fields[1]
        assert eligible == "1"


def test_placed_model_keeps_values_parameters_ties_and_outputs():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("jamba-tiny")).eval()
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) > 1  # tiny: below MIN_BYTES
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = {name: p for name, p in model.named_parameters()}
    prompt = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        expected = model(prompt).logits
    expected_tokens = generate(model, prompt, max_new_tokens=5, temperature=0.0)
    assert place_parameters(model, min_bytes=0)
    params = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1  # one mapping for all
    assert all(p.data_ptr() % huge_pages.ALIGN == 0 for p in params)
    for name, p in model.named_parameters():
        assert p is objects[name] and torch.equal(p, before[name])
    assert model.lm_head.weight is model.embedding.weight  # still tied
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, expected)
    assert torch.equal(generate(model, prompt, max_new_tokens=5, temperature=0.0), expected_tokens)
    # an optimizer step moves the placed weights themselves
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(prompt, labels=prompt).loss.backward()
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, before["embedding.weight"])
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def test_placement_leaves_views_of_one_storage_and_small_modules_alone():
    module = torch.nn.Linear(4, 4)
    assert not place_parameters(module)  # far below MIN_BYTES
    shared = torch.zeros(8)
    module.weight = torch.nn.Parameter(shared[:4].view(2, 2))  # two Parameters viewing one storage
    module.bias = torch.nn.Parameter(shared[4:])
    module.weight.data = shared[:4].view(2, 2)
    module.bias.data = shared[4:]
    assert not place_parameters(module, min_bytes=0)
    assert module.weight.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()


def test_a_model_on_cpu_is_placed_at_construction(monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    model = HybridLM(ModelConfig.preset("mamba-tiny"))
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    assert next(model.parameters()).data_ptr() % huge_pages.HUGE_PAGE == 0
