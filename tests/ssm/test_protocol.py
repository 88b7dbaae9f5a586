"""The shared protocol, checked on every global extractor the same way."""

import pytest
import torch
from ssm_helpers import run_steps

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
    y_steps, _ = run_steps(ssm, x, ssm.initial_state(2))
    torch.testing.assert_close(y_steps, y, rtol=1e-4, atol=1e-5)


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


# The SSMs whose padding may sit anywhere (LSTMGlobal takes right padding only), with
# several output channels where the SSM has them.
ANY_PADDING = [("hyena", {}), ("s4", {"channels": 2}), ("s4d", {"channels": 2}), ("s5", {})]


@pytest.mark.parametrize("kind, extra", ANY_PADDING)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_left_and_right_padding_change_nothing(kind, extra, bidirectional):
    B, L, H = 2, 30, 4
    ssm = make(kind, d_model=H, bidirectional=bidirectional, **extra)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 22:] = True  # right padding
    mask[1, :5] = True  # left padding
    x = torch.randn(B, L, H)
    x2 = torch.where(mask.unsqueeze(-1), 100 * torch.randn(B, L, H), x)
    y, y2 = ssm(x, padding_mask=mask), ssm(x2, padding_mask=mask)
    torch.testing.assert_close(y, y2)
    assert torch.all(y[mask] == 0)
    assert torch.all(y[~mask].abs().sum(-1) > 0)
    # right padding = the unpadded sequence cut short
    torch.testing.assert_close(y[0, :22], ssm(x[:1, :22])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_frozen_has_zero_trainable_parameters(kind, bidirectional):
    ssm = make(kind, bidirectional=bidirectional, trainable=False)
    assert ssm.trainable is False
    assert sum(p.numel() for p in ssm.parameters() if p.requires_grad) == 0
    assert sum(p.numel() for p in ssm.parameters()) > 0
    assert not ssm(torch.randn(2, 10, 6)).requires_grad
    assert sum(p.numel() for p in make(kind, bidirectional=bidirectional).parameters()
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
