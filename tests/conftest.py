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
