"""GlobalLayer's ways of mixing the SSM with attention, and pre / post LayerNorm, held to the
equations they implement, and step() decoding held to forward for each."""

import pytest
import torch

from spadeformer.config import SpadeConfig
from spadeformer.layers import GlobalLayer, LocalLayer, MaskedBatchNorm, ScaleNorm, make_norm
from spadeformer.models import SpadeForCausalLM


def tiny(**overrides):
    base = dict(vocab_size=37, d_model=32, n_heads=4, d_ff=64, window_size=4, dropout=0.0)
    base.update(overrides)
    return SpadeConfig.from_preset("spade-s4-window", size="tiny", **base)


def global_layer(model) -> GlobalLayer:
    layer = model.backbone.layers[0]
    assert isinstance(layer, GlobalLayer)
    return layer


@pytest.mark.parametrize("combine", ["concat", "add", "stack"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_global_layer_follows_its_equation(combine, norm):
    torch.manual_seed(0)
    layer = global_layer(SpadeForCausalLM(tiny(combine=combine, add_weight=0.3, norm=norm)))
    layer.eval()
    x = torch.randn(2, 9, 32)

    def mix(h):
        g = layer.ssm(h)
        if combine == "concat":
            both = torch.cat([layer.norm_local(layer.attn(h)), layer.norm_global(g)], -1)
            return both @ layer.mix_proj.weight.T + layer.mix_proj.bias
        if combine == "add":
            return 0.3 * layer.norm_global(g) + 0.7 * layer.norm_local(layer.attn(h))
        return layer.attn(g)  # stack: attention reads the SSM's output

    if norm == "pre":
        h = x + mix(layer.norm_mix(x))
        expected = h + layer.ffn(layer.norm_ffn(h))
    else:
        h = layer.norm_mix(x + mix(x))
        expected = layer.norm_ffn(h + layer.ffn(h))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_local_layer_pre_and_post_norm(norm):
    torch.manual_seed(0)
    model = SpadeForCausalLM(tiny(norm=norm)).eval()
    layer = model.backbone.layers[1]
    assert isinstance(layer, LocalLayer)
    x = torch.randn(2, 9, 32)
    if norm == "pre":
        h = x + layer.attn(layer.norm_mix(x))
        expected = h + layer.ffn(layer.norm_ffn(h))
    else:
        h = layer.norm_mix(x + layer.attn(x))
        expected = layer.norm_ffn(h + layer.ffn(h))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combine, norm", [("add", "pre"), ("stack", "pre"), ("concat", "post"),
                                           ("add", "post"), ("stack", "post")])
def test_step_equals_forward_for_each_combine_and_norm(combine, norm, stepwise_logits):
    torch.manual_seed(0)
    model = SpadeForCausalLM(tiny(combine=combine, norm=norm)).eval()
    ids = torch.randint(0, 37, (2, 11))  # longer than the window
    torch.testing.assert_close(stepwise_logits(model, ids), model(ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_combine_changes_the_output():
    torch.manual_seed(0)
    ids = torch.randint(0, 37, (1, 9))
    outs = []
    for combine in ("concat", "add", "stack"):
        torch.manual_seed(0)
        outs.append(SpadeForCausalLM(tiny(combine=combine)).eval()(ids).logits)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_scale_and_rms_norms_follow_their_formulas():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    rms = (x.square().mean(-1, keepdim=True) + 1e-5).sqrt()
    scale = ScaleNorm().double()
    with torch.no_grad():
        scale.scale.fill_(1.7)
    torch.testing.assert_close(scale(x), 1.7 * x / rms)
    assert [p.shape for p in scale.parameters()] == [torch.Size([])]  # one scalar
    rmsnorm = make_norm("rmsnorm", 8).double()
    with torch.no_grad():
        rmsnorm.weight.copy_(torch.arange(1.0, 9.0))
    torch.testing.assert_close(rmsnorm(x), x / rms * torch.arange(1.0, 9.0, dtype=torch.float64))
    assert isinstance(make_norm("layernorm", 8), torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm type must be one of"):
        make_norm("groupnorm", 8)


def test_masked_batch_norm_is_batch_norm_over_the_real_tokens():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, dtype=torch.float64) * 3 + 1
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    mask[2, :2] = True
    ours = MaskedBatchNorm(5).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.normal_()
    torch_bn = torch.nn.BatchNorm1d(5).double()
    torch_bn.load_state_dict(ours.state_dict(), strict=False)
    for _ in range(2):  # training: this batch's statistics over the real tokens only
        got = ours(x, mask)
        torch.testing.assert_close(got[~mask], torch_bn(x[~mask]))
    torch.testing.assert_close(ours.running_mean, torch_bn.running_mean)
    torch.testing.assert_close(ours.running_var, torch_bn.running_var)
    other = x.clone()
    other[mask] = 1e3  # what padded tokens hold does not matter
    torch.testing.assert_close(ours(other, mask)[~mask], got[~mask])
    torch_bn(other[~mask])  # keep the two running averages in step
    torch.testing.assert_close(ours(x)[0], torch_bn(x.reshape(-1, 5)).reshape(3, 7, 5)[0])
    ours.eval(), torch_bn.eval()  # eval: the running averages, token by token
    torch.testing.assert_close(ours(x[:, 0]), torch_bn(x[:, 0]))
    with pytest.raises(ValueError, match="at least 2 tokens.*call .eval()"):
        ours.train()(x[:1, :1])


def test_sync_batch_norm_is_batch_norm_in_one_process():
    # its all-ranks statistics: tests/training/test_distributed.py (two gloo ranks)
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5) * 3 + 1
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    sync, plain = make_norm("syncbatchnorm", 5), make_norm("batchnorm", 5)
    assert isinstance(sync, MaskedBatchNorm) and sync.sync and not plain.sync
    torch.testing.assert_close(sync(x, mask), plain(x, mask))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    assert "sync=True" in repr(sync)
    with pytest.raises(TypeError, match="sync must be a bool"):
        MaskedBatchNorm(5, sync="yes")


def test_feed_forward_refuses_bad_rates_by_name():
    from spadeformer.layers import FeedForward

    ffn = FeedForward(8, 16, dropout=0.1, hidden_dropout=0.0)
    assert (ffn.dropout.p, ffn.hidden_dropout.p) == (0.1, 0.0)
    assert FeedForward(8, 16, dropout=0.2).hidden_dropout.p == 0.2  # None: the same rate
    for kwargs, match in ((dict(dropout=1.0), "dropout must be a number in"),
                          (dict(hidden_dropout=-0.1), "hidden_dropout must be a number in"),
                          (dict(dropout=True), "dropout must be a number in")):
        with pytest.raises(ValueError, match=match):
            FeedForward(8, 16, **kwargs)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        LocalLayer(8, 2, 16, attention=None, dropout=1.5)
