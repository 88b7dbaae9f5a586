"""T5 span corruption on bytes: what is dropped comes back in the target, nothing else."""

import json

import numpy as np
import pytest

from spadeformer.data.lra_common import CorruptFileError
from spadeformer.data.seq2seq import EOS_ID, FIRST_SENTINEL_ID, NUM_SENTINELS
from spadeformer.data.span_corruption import (
    SpanCorruptionDataset,
    corrupt_spans,
    random_spans_noise_mask,
)


def uncorrupt(inputs, targets):
    """Put each sentinel's span from the target back into the input."""
    spans, current = {}, None
    assert targets[-1] == EOS_ID
    for t in targets[:-1]:
        if t >= FIRST_SENTINEL_ID:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs:
        out += spans[int(t)] if t >= FIRST_SENTINEL_ID else [int(t)]
    return out


@pytest.mark.parametrize("length", [2, 3, 10, 50, 511, 4096])
def test_the_target_holds_exactly_what_the_input_lost(length):
    rng = np.random.default_rng(length)
    ids = rng.integers(1, 257, length)
    mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
    inputs, targets = corrupt_spans(ids, mask)
    assert uncorrupt(inputs, targets) == ids.tolist()
    spans = int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
    assert not mask[0]  # a kept run comes first
    assert len(inputs) == length - int(mask.sum()) + spans
    assert len(targets) == int(mask.sum()) + spans + 1
    sentinels = [t for t in inputs.tolist() if t >= FIRST_SENTINEL_ID]
    assert sentinels == list(range(FIRST_SENTINEL_ID, FIRST_SENTINEL_ID + spans))


def test_noise_density_and_span_length_are_t5s_on_average():
    rng = np.random.default_rng(0)
    masks = [random_spans_noise_mask(512, 0.15, 3.0, rng) for _ in range(200)]
    density = np.mean([m.mean() for m in masks])
    spans = np.mean([(m & ~np.concatenate([[False], m[:-1]])).sum() for m in masks])
    assert density == pytest.approx(round(512 * 0.15) / 512)  # the exact count every time
    assert spans == pytest.approx(77 / 3, abs=0.5)  # round(77 / 3) = 26 spans
    long = random_spans_noise_mask(100_000, 0.15, 3.0, rng)  # more spans than sentinels
    assert (long & ~np.concatenate([[False], long[:-1]])).sum() == NUM_SENTINELS


def test_dataset_chunks_documents_and_repeats_its_noise(tmp_path):
    path = tmp_path / "train.jsonl"
    docs = ["a" * 25, "short", "b" * 7]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = SpanCorruptionDataset(path, seq_len=10)
    assert len(ds) == 3 + 1 + 1  # 25 -> 10, 10, 5; "short"; 7
    first = ds[0]
    assert first["labels"].tolist() == ds[0]["labels"].tolist()  # same item, same noise
    restored = uncorrupt(first["input_ids"].numpy(), first["labels"].numpy())
    assert restored == [ord("a") + 1] * 10
    path.write_text(json.dumps({"text": "the quick brown fox jumps over a lazy dog " * 9}))
    seeds = [SpanCorruptionDataset(path, seq_len=128, seed=s) for s in (0, 0, 1)]
    items = [[d[i]["input_ids"].tolist() for i in range(len(d))] for d in seeds]
    assert items[0] == items[1] and items[0] != items[2]  # the seed decides the noise
    for kwargs, match in [(dict(seq_len=1), "seq_len"), (dict(noise_density=1.0), "noise_"),
                          (dict(mean_span_length=0.5), "mean_span_length")]:
        with pytest.raises(ValueError, match=match):
            SpanCorruptionDataset(path, **kwargs)
    path.write_text('{"txt": "x"}\n')
    with pytest.raises(CorruptFileError, match=r"train.jsonl:1: 'text' must be a non-empty"):
        SpanCorruptionDataset(path)
