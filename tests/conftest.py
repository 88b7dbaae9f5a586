import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds (house rule: seed every test)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def stepwise_logits():
    """model, ids (batch, length) -> the logits of step() decoding token by token, stacked
    (batch, length, vocab): what the parallel forward must equal."""

    def run(model, ids: torch.Tensor) -> torch.Tensor:
        state = model.initial_state(ids.shape[0])
        steps = []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
        return torch.stack(steps, 1)

    return run
