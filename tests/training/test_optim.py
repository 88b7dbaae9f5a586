import copy

import pytest
import torch
from torch import nn

from spadeformer.ssm.s4 import S4
from spadeformer.training.optim import param_groups


class Mixed(nn.Module):
    """Embedding (tied with the head), S4, Linear, LayerNorm: every kind of parameter."""

    def __init__(self, trainable_ssm=True, ssm_lr=None):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.ssm = S4(4, d_state=4, lr=ssm_lr, trainable=trainable_ssm)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.head(self.norm(self.proj(self.ssm(self.embed(ids)))))


def _by_name(groups):
    return {g["name"]: g for g in groups}


def _ids(params):
    return {id(p) for p in params}


def test_groups_split_weights_biases_and_ssm():
    m = Mixed()
    groups = param_groups(m, lr=1e-2, weight_decay=0.1, ssm_lr=1e-3)
    g = _by_name(groups)
    assert set(g) == {"decay", "no_decay", "ssm"}
    ssm = m.ssm
    hinted = [ssm.log_neg_lambda_re, ssm.lambda_im, ssm.P, ssm.B, ssm.log_dt]
    assert _ids(g["ssm"]["params"]) == _ids(hinted)
    assert g["ssm"]["lr"] == 1e-3 and g["ssm"]["weight_decay"] == 0.0
    assert _ids(g["decay"]["params"]) == _ids(
        [m.embed.weight, ssm.C, ssm.output_linear.weight, m.proj.weight]
    )
    assert g["decay"]["lr"] == 1e-2 and g["decay"]["weight_decay"] == 0.1
    assert _ids(g["no_decay"]["params"]) == _ids(  # D: a skip per channel, (channels, d)
        [ssm.D, ssm.output_linear.bias, m.proj.bias, m.norm.weight, m.norm.bias]
    )
    assert g["no_decay"]["weight_decay"] == 0.0 and g["no_decay"]["lr"] == 1e-2


def test_every_trainable_parameter_exactly_once_even_when_tied():
    m = Mixed()
    groups = param_groups(m, lr=1e-2, weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in m.parameters()}  # parameters() dedups tied weights
    assert id(m.head.weight) in seen


def test_lr_resolution_hint_then_ssm_lr_then_lr():
    assert _by_name(param_groups(Mixed(), lr=1e-2, weight_decay=0.0))["ssm"]["lr"] == 1e-2
    assert _by_name(param_groups(Mixed(), 1e-2, 0.0, ssm_lr=2e-3))["ssm"]["lr"] == 2e-3
    hinted = Mixed(ssm_lr=5e-4)
    assert _by_name(param_groups(hinted, 1e-2, 0.0, ssm_lr=2e-3))["ssm"]["lr"] == 5e-4


def test_distinct_hints_get_distinct_groups():
    m = nn.ModuleDict({"a": S4(4, d_state=4, lr=1e-3), "b": S4(4, d_state=4, lr=2e-3),
                       "c": S4(4, d_state=4, lr=1e-3)})
    groups = [g for g in param_groups(m, 1e-2, 0.1) if g["name"].startswith("ssm")]
    assert [g["name"] for g in groups] == ["ssm", "ssm_1"]
    assert sorted(g["lr"] for g in groups) == [1e-3, 2e-3]
    assert [len(g["params"]) for g in groups] == [10, 5]


def test_frozen_parameters_are_left_out():
    m = Mixed(trainable_ssm=False)
    groups = param_groups(m, lr=1e-2, weight_decay=0.1)
    assert "ssm" not in _by_name(groups)
    seen = {id(p) for g in groups for p in g["params"]}
    assert not seen & {id(p) for p in m.ssm.parameters()}
    assert seen == {id(p) for p in m.parameters() if p.requires_grad}


def test_hints_survive_deepcopy():
    m = copy.deepcopy(Mixed())
    assert not hasattr(m.ssm.log_dt, "_optim")  # torch drops Parameter attributes on deepcopy
    g = _by_name(param_groups(m, 1e-2, 0.1, ssm_lr=1e-3))
    assert len(g["ssm"]["params"]) == 5 and g["ssm"]["weight_decay"] == 0.0


def test_adamw_steps_with_the_groups():
    m = Mixed()
    opt = torch.optim.AdamW(param_groups(m, lr=1e-2, weight_decay=0.1, ssm_lr=1e-3))
    before = m.ssm.log_dt.detach().clone()
    m(torch.randint(0, 11, (2, 7))).sum().backward()
    opt.step()
    assert not torch.equal(before, m.ssm.log_dt)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "ssm"]


def test_no_decay_for_ssm_parameters_under_adamw():
    # A zero gradient isolates weight decay: hinted params must not move, weights must shrink.
    m = Mixed()
    opt = torch.optim.AdamW(param_groups(m, lr=0.1, weight_decay=0.5))
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    P0, W0 = m.ssm.P.detach().clone(), m.proj.weight.detach().clone()
    opt.step()
    assert torch.equal(m.ssm.P, P0)
    torch.testing.assert_close(m.proj.weight, W0 * (1 - 0.1 * 0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"weight_decay": -0.1}, "weight_decay must be a number >= 0, got -0.1"),
        ({"ssm_lr": 0}, "ssm_lr must be a positive number, got 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"lr": 1e-3, "weight_decay": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        param_groups(Mixed(), **args)


def test_bad_model_and_bad_hint():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        param_groups([nn.Parameter(torch.zeros(2))], 1e-3, 0.0)
    lin = nn.Linear(2, 2)
    lin.bias._optim = "fast"
    with pytest.raises(TypeError, match="'bias' has an _optim hint that is not a dict"):
        param_groups(lin, 1e-3, 0.0)
    lin.bias._optim = {"lr": -1.0}
    with pytest.raises(ValueError, match="_optim\\['lr'\\] of 'bias' must be a positive number"):
        param_groups(lin, 1e-3, 0.0)


@pytest.mark.parametrize("kind,vector", [("s4", "D"), ("s4d", "D"), ("s5", "D"),
                                         ("hyena", "filter_bias")])
def test_per_channel_vectors_get_no_weight_decay_whatever_their_rank(kind, vector):
    # S4's D is (channels, d_model), S5's (d_model,): both are skips, neither is decayed
    from spadeformer.ssm import build_ssm

    for ssm in (build_ssm(kind, 8, bidirectional=False),
                copy.deepcopy(build_ssm(kind, 8, bidirectional=True))):
        groups = {g["name"]: g for g in param_groups(ssm, 1e-3, 0.1)}
        param = ssm.get_parameter(vector)
        assert any(param is p for p in groups["no_decay"]["params"])
        assert not any(param is p for p in groups["decay"]["params"])
