"""Synthetic task generators: shapes, determinism, masks on exactly the answers, answers determined by context."""

import numpy as np
import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.data.tasks import IGNORE, TASKS, get_task, task_from_dict
from hybridlm.evaluate import task_accuracy

LENGTHS = [7, 16, 33, 100, 257]


def _rows(task, length, n=24, seed=0):
    b = task.sample(n, length, np.random.default_rng(seed))
    assert b.input_ids.shape == b.labels.shape == (n, length)
    assert b.input_ids.dtype == torch.int64
    assert int(b.input_ids.min()) >= 0 and int(b.input_ids.max()) < task.vocab_size
    scored = b.labels != IGNORE
    if task.name != "mqar":  # MQAR's answers are labels only (Zoology's format), the others' are in the text
        assert torch.equal(b.labels[scored], b.input_ids[scored])
    return b.input_ids.numpy(), scored.numpy()


def _induction_oracle(tokens, trigger, k):
    first = int(np.flatnonzero(tokens == trigger)[0])
    return tokens[first + 1 : first + 1 + k]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("k,triggers", [(1, 1), (2, 3)])
def test_induction_heads(length, k, triggers):
    task = get_task("induction_heads", induction_len=k, num_triggers=triggers)
    if length < task.min_length:
        pytest.skip("shorter than the task allows")
    tokens, scored = _rows(task, length)
    for row, mask in zip(tokens, scored, strict=True):
        assert mask.sum() == k and mask[-k:].all()  # exactly the answer after the final trigger
        assert row[-k - 1] == task.trigger
        assert task.noop not in row
        positions = np.flatnonzero(row[: -k - 1] == task.trigger)
        assert 1 <= len(positions) <= triggers
        # the answer is the tokens after the first trigger, and every earlier trigger is followed by them
        np.testing.assert_array_equal(_induction_oracle(row, task.trigger, k), row[-k:])
        for p in positions:
            np.testing.assert_array_equal(row[p + 1 : p + 1 + k], row[-k:])


@pytest.mark.parametrize("length", LENGTHS[2:])
def test_selective_copy(length):
    task = get_task("selective_copy", n_tokens=6)
    tokens, scored = _rows(task, length)
    for row, mask in zip(tokens, scored, strict=True):
        assert mask.sum() == 6 and mask[-6:].all()
        assert row[-7] == task.separator and task.separator not in row[:-7]
        data = row[:-7][row[:-7] != task.noise]
        np.testing.assert_array_equal(data, row[-6:])  # answers = the scattered data tokens in order
        assert (row[-6:] >= 2).all()


@pytest.mark.parametrize("length", LENGTHS[2:])
def test_mqar(length):
    task = get_task("mqar", vocab_size=32, n_pairs=4)
    tokens, scored = _rows(task, length)
    labels = task.sample(24, length, np.random.default_rng(0)).labels.numpy()
    half = task.vocab_size // 2
    for row, mask, label in zip(tokens, scored, labels, strict=True):
        keys, values = row[0:8:2], row[1:8:2]
        assert ((keys >= 1) & (keys < half)).all() and len(set(keys)) == 4  # Zoology: keys from the first half
        assert ((values >= half) & (values < task.vocab_size)).all() and len(set(values)) == 4  # values: second
        answers = np.flatnonzero(mask)
        assert len(answers) == 4 and (answers >= 9).all()
        lookup = dict(zip(keys, values, strict=True))
        queried = [row[a - 1] for a in answers]
        assert sorted(queried) == sorted(keys)  # each key asked once
        assert all(label[a] == lookup[row[a - 1]] for a in answers)  # the answer is the key's value ...
        assert (row[8:] < half).all()  # ... which the input never shows after the pairs (no answer given away)


def test_mqar_mixed_pair_counts():
    """Zoology's training mix: each sequence holds min_pairs..n_pairs pairs; accuracy is scored at n_pairs."""
    task = get_task("mqar", vocab_size=64, n_pairs=8, min_pairs=2)
    b = task.sample(300, 64, np.random.default_rng(0))
    half = task.vocab_size // 2
    counts = []
    for row, label in zip(b.input_ids.numpy(), b.labels.numpy(), strict=True):
        answers = np.flatnonzero(label != IGNORE)
        n = len(answers)
        counts.append(n)
        keys, values = row[0 : 2 * n : 2], row[1 : 2 * n : 2]
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < task.vocab_size)).all()
        assert (row[2 * n :] < half).all()  # the pairs come first, then only keys and filler
        lookup = dict(zip(keys, values, strict=True))
        assert sorted(row[answers - 1]) == sorted(keys)
        assert all(label[a] == lookup[row[a - 1]] for a in answers)
    assert set(counts) == set(range(2, 9))  # every count in the range, uniformly drawn
    full = task.scored_task()
    assert full.describe() == get_task("mqar", vocab_size=64, n_pairs=8).describe()
    assert ((full.sample(50, 64, np.random.default_rng(1)).labels != IGNORE).sum(1) == 8).all()
    # a sequence holds no more pairs than fit (length // 4): a length curriculum starts on fewer pairs
    fitting = get_task("mqar", vocab_size=256, n_pairs=64, min_pairs=64)
    for length, pairs in ((64, 16), (101, 25), (256, 64), (300, 64)):
        b = fitting.sample(8, length, np.random.default_rng(2))
        assert ((b.labels != IGNORE).sum(1) == pairs).all()
    with pytest.raises(ValueError, match="at least 256 tokens"):
        fitting.scored_task().sample(1, 64, np.random.default_rng(0))
    model = HybridLM(ModelConfig(vocab_size=64, d_model=16, n_layers=1, layers="A", n_heads=2))
    mixed, fixed = task_accuracy(model, task, 64, n_samples=8), task_accuracy(model, full, 64, n_samples=8)
    assert mixed == fixed and mixed.n == 8 * 8  # scored on 8 answers a sequence, as the unmixed task


def test_seeded_and_any_length():
    for name in TASKS:
        task = get_task(name)
        a = task.sample(4, 300, np.random.default_rng(5))
        b = task.sample(4, 300, np.random.default_rng(5))
        c = task.sample(4, 300, np.random.default_rng(6))
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert not torch.equal(a.input_ids, c.input_ids)
        assert task_from_dict(task.describe()).describe() == task.describe()


def test_accuracy_at_any_length():
    task = get_task("induction_heads")
    model = HybridLM(ModelConfig(vocab_size=16, d_model=16, n_layers=1, layers="S", ffn="none",
                                 mamba2_d_state=8, mamba2_headdim=8, mamba2_chunk_size=8))
    for length in (task.min_length, 50, 301):
        s = task_accuracy(model, task, length, n_samples=6, batch_size=4)
        assert s.n == 6 and 0.0 <= s.accuracy <= 1.0 and s.loss > 0


def test_bad_task_input():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="at least 5 tokens"):
        get_task("induction_heads").sample(2, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="vocab_size"):
        get_task("mqar", vocab_size=8, n_pairs=8)
    for bad in (0, 9):
        with pytest.raises(ValueError, match=rf"min_pairs: expected 1 <= min_pairs <= n_pairs \(8\), got {bad}"):
            get_task("mqar", n_pairs=8, min_pairs=bad)
    small = HybridLM(ModelConfig(vocab_size=8, d_model=16, n_layers=1, layers="A", n_heads=2))
    with pytest.raises(ValueError, match="uses 16 tokens"):
        task_accuracy(small, get_task("induction_heads"), 32)
