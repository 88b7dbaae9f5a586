"""Parameter budgets of the paper's sizes, counted on the meta device (no allocation)."""

import pytest
import torch

from spadeformer.config import SYSTEMS, SpadeConfig
from spadeformer.models import SpadeForSequenceClassification


def count_on_meta(cls, cfg) -> int:
    with torch.device("meta"):
        model = cls(cfg)
    return model.num_parameters()


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_lra_size_is_under_two_million(system):
    cfg = SpadeConfig.from_preset(system, size="lra", causal=False, vocab_size=256,
                                  num_labels=10)
    n = count_on_meta(SpadeForSequenceClassification, cfg)
    assert 100_000 < n < 2_000_000, n
