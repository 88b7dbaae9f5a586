"""The shared protocol, checked on every global extractor the same way."""

import pytest
import torch

from spadeformer.ssm import build_ssm

KINDS = {
    "s4": {"d_state": 8},
    "s4d": {"d_state": 8},
    "s5": {"d_state": 8},
    "hyena": {},
    "lstm": {},
}


def make(kind, d_model=6, **extra):
    return build_ssm(kind, d_model, **{**KINDS[kind], **extra})


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_step_equals_forward(kind):
    ssm = make(kind, bidirectional=False).eval()
    x = torch.randn(2, 23, 6)
    y = ssm(x)
    state = ssm.initial_state(2)
    ys = []
    for t in range(x.shape[1]):
        y_t, state = ssm.step(x[:, t], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_isolates_real_positions(kind, bidirectional):
    ssm = make(kind, bidirectional=bidirectional).eval()
    x = torch.randn(2, 17, 6)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[0, 12:] = True
    y1 = ssm(x, padding_mask=mask)
    x2 = x.clone()
    x2[0, 12:] = 50 * torch.randn(5, 6)
    y2 = ssm(x2, padding_mask=mask)
    torch.testing.assert_close(y1[~mask], y2[~mask])
    assert torch.all(y1[mask] == 0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_frozen_has_zero_trainable_parameters(kind):
    ssm = make(kind, bidirectional=False, trainable=False)
    assert ssm.trainable is False
    assert sum(p.numel() for p in ssm.parameters() if p.requires_grad) == 0
    assert sum(p.numel() for p in make(kind, bidirectional=False).parameters()
               if p.requires_grad) > 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_step_on_bidirectional_is_an_error(kind):
    ssm = make(kind, bidirectional=True)
    with pytest.raises(RuntimeError, match="bidirectional"):
        ssm.step(torch.randn(2, 6), None)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_input_errors(kind):
    ssm = make(kind, bidirectional=False)
    with pytest.raises(ValueError, match="d_model=6"):
        ssm(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="shape"):
        ssm(torch.randn(5, 6))
    with pytest.raises(TypeError, match="floating"):
        ssm(torch.ones(2, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask"):
        ssm(torch.randn(2, 5, 6), padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="d_model"):
        make(kind, d_model=0, bidirectional=False)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_runs_in_fp32_under_autocast(kind):
    ssm = make(kind, bidirectional=False)
    x = torch.randn(2, 9, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ssm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ssm(x), rtol=2e-2, atol=2e-2)
