"""The Mega block: its equations written out, fast attention == dense reference, step() ==
forward, padding isolation, config rules."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from spadeformer import SpadeConfig
from spadeformer.layers import MaskedBatchNorm
from spadeformer.mega import MegaLayer
from spadeformer.ops.position_bias import RotaryRelativeBias, SimpleRelativeBias
from spadeformer.ssm.ema import MultiHeadEMA

PATTERNS = [("chunk", dict(chunk_size=5)), ("window", dict(window_size=3)), ("full", {})]


def make(pattern="chunk", causal=True, norm="pre", d=8, spread=0.5, **kw):
    """A small block whose parameters are all O(spread): at Mega's own initialisation
    (weights N(0, 0.02^2)) the attention barely moves the output, and a test comparing
    outputs would not see a wrong attention."""
    sizes = dict(PATTERNS)[pattern]
    torch.manual_seed(0)
    layer = MegaLayer(d, 2 * d, ema=MultiHeadEMA(d, n_dims=3, bidirectional=not causal),
                      pattern=pattern, causal=causal, z_dim=6, v_dim=10, norm=norm,
                      **{**sizes, **kw})
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, spread)
    return layer


def allowed(pattern, L, causal, window=3, chunk=5):
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    ok = torch.ones(L, L, dtype=torch.bool)
    if pattern == "window":
        ok = (i - j).abs() <= window
    if pattern == "chunk":
        ok = (i // chunk) == (j // chunk)
    return ok & (j <= i) if causal else ok


def relative_bias_by_hand(layer: MegaLayer, offsets: torch.Tensor) -> torch.Tensor:
    """b_rel at each offset k - q: the simple bias's clipped table entry, or the rotary bias
    alpha^T R_r beta with pair j = (j, j + z/2) turned by r * 10000^(-j / (z/2))."""
    bias = layer.relative_bias
    if isinstance(bias, SimpleRelativeBias):
        reach = bias.max_positions - 1
        return bias.table[offsets.clamp(-reach, reach) + reach]
    half = layer.z_dim // 2
    phi = offsets.unsqueeze(-1).double() * 10000.0 ** (-torch.arange(half).double() / half)
    a1, a2 = bias.alpha.split(half)
    b1, b2 = bias.beta.split(half)
    return (phi.cos() * (a1 * b1 + a2 * b2) + phi.sin() * (a2 * b1 - a1 * b2)).sum(-1)


def mega_by_the_equations(layer: MegaLayer, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's equations with the weights split by hand; pre-LN feeds LN(X)
    to the EMA and V, post-LN feeds X and normalises after each residual sum."""
    d, z, v = layer.d_model, layer.z_dim, layer.v_dim
    pre = layer.norm_placement == "pre"
    xn = layer.norm_mix(x) if pre else x
    W, b = layer.mx_proj.weight, layer.mx_proj.bias
    W_u, W_z, W_r, W_h = W.split([d, z, v, d])
    b_u, b_z, b_r, b_h = b.split([d, z, v, d])
    mx = F.silu(layer.ema(xn))
    Z = F.silu(mx @ W_z.T + b_z)
    Q = layer.qk_scale[0] * Z + layer.qk_offset[0]
    K = layer.qk_scale[1] * Z + layer.qk_offset[1]
    V = F.silu(layer.v_proj(xn))
    L = x.shape[1]
    b_rel = relative_bias_by_hand(layer, torch.arange(L)[None, :] - torch.arange(L)[:, None])
    ok = allowed(layer.pattern, L, layer.causal)
    if layer.attention_fn == "softmax":
        scores = Q @ K.transpose(1, 2) / math.sqrt(z) + b_rel
        O = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1) @ V
    else:  # Mega's element-wise weights: scores over the count of keys seen, unnormalised
        n = ok.sum(-1, keepdim=True)
        scores = Q @ K.transpose(1, 2) / n + b_rel
        if layer.attention_fn == "laplace":
            weights = 0.5 * (1 + torch.erf((scores - math.sqrt(0.5))
                                           / (math.sqrt(1 / (4 * math.pi)) * math.sqrt(2))))
        else:
            weights = torch.clamp(scores, min=0) ** 2
        O = (weights * ok) @ V
    R = F.silu(mx @ W_r.T + b_r)
    U = torch.sigmoid(mx @ W_u.T + b_u)
    H = F.silu(mx @ W_h.T + b_h + layer.h_proj(R * O))
    Y = U * H + (1 - U) * x

    def ffn(y):  # Mega's feed-forward: SiLU between the two linears
        return layer.ffn.fc2(F.silu(layer.ffn.fc1(y)))

    if pre:
        return Y + ffn(layer.norm_ffn(Y))
    Y = layer.norm_mix(Y)
    return layer.norm_ffn(Y + ffn(Y))


# (norm placement, attention function): softmax with both placements, the element-wise ones
NORM_AND_FN = [("pre", "softmax"), ("post", "softmax"), ("pre", "laplace"), ("post", "laplace"),
               ("pre", "relu2")]


@pytest.mark.parametrize("pattern", [p for p, _ in PATTERNS])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("norm, attention_fn", NORM_AND_FN)
def test_forward_follows_the_equations(pattern, causal, norm, attention_fn):
    layer = make(pattern, causal, norm, attention_fn=attention_fn).double()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), mega_by_the_equations(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", [p for p, _ in PATTERNS])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("norm, attention_fn", NORM_AND_FN)
def test_fast_attention_matches_the_dense_reference(pattern, causal, norm, attention_fn):
    layer = make(pattern, causal, norm, attention_fn=attention_fn)
    x = torch.randn(2, 37, 8)
    pad = torch.zeros(2, 37, dtype=torch.bool)
    pad[1, 30:] = True
    fast, ref = layer(x, pad), layer.forward_ref(x, pad)
    torch.testing.assert_close(fast[~pad], ref[~pad], rtol=1e-4, atol=1e-4)
    no_bias = copy.deepcopy(layer)
    no_bias.relative_bias = None
    assert not torch.allclose(no_bias(x, pad)[~pad], fast[~pad], atol=1e-2)  # the bias counts
    if attention_fn != "softmax":
        softmax = copy.deepcopy(layer)
        softmax.attention_fn = "softmax"
        assert not torch.allclose(softmax(x, pad)[~pad], fast[~pad], atol=1e-2)  # the fn counts
    fast.sum().backward()  # every path trains
    assert layer.qk_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("pattern", [p for p, _ in PATTERNS])
@pytest.mark.parametrize("norm, attention_fn, norm_type", [
    ("pre", "softmax", "layernorm"), ("post", "softmax", "layernorm"),
    ("pre", "laplace", "scalenorm"), ("post", "relu2", "rmsnorm")])
def test_step_equals_forward_across_chunk_boundaries(pattern, norm, attention_fn, norm_type):
    layer = make(pattern, True, norm, attention_fn=attention_fn, norm_type=norm_type).double()
    x = torch.randn(2, 17, 8, dtype=torch.float64)  # chunks of 5: three boundaries
    state = layer.initial_state(2)
    ys = []
    for t in range(17):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), layer(x), rtol=1e-9, atol=1e-9)
    ema_state, cache = state
    assert ema_state.shape == (2, 8, 3)
    if pattern == "chunk":
        assert cache.key.shape == (2, 1, 5, 6) and cache.value.shape == (2, 1, 5, 10)


@pytest.mark.parametrize("pattern", [p for p, _ in PATTERNS])
@pytest.mark.parametrize("attention_fn", ["softmax", "laplace"])
def test_padding_changes_nothing_at_real_positions(pattern, attention_fn):
    # laplace too: its scores divide by the count of keys seen, which must leave out padding
    layer = make(pattern, causal=False, attention_fn=attention_fn)
    x = torch.randn(1, 12, 8)
    pad = torch.zeros(1, 12, dtype=torch.bool)
    pad[0, 9:] = True
    other = x.clone()
    other[0, 9:] = torch.randn(3, 8) * 10
    torch.testing.assert_close(layer(x, pad)[0, :9], layer(other, pad)[0, :9])
    torch.testing.assert_close(layer(x, pad)[0, :9], layer(x[:, :9])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_batch_norm_block_isolates_padding_in_training(norm):
    layer = make("chunk", causal=False, norm=norm, norm_type="batchnorm").double().train()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 9:] = True
    other = x.clone()
    other[1, 9:] = 100.0  # padded tokens must not reach the batch statistics
    torch.testing.assert_close(layer(x, pad)[~pad], layer(other, pad)[~pad])
    assert layer.norm_mix.running_mean.abs().sum() > 0  # training moved the running averages
    trained = layer(x, pad)
    assert not torch.allclose(layer.eval()(x, pad)[~pad], trained[~pad])  # eval: the averages
    with pytest.raises(ValueError, match="norm_type='batchnorm' needs causal=False"):
        make("chunk", causal=True, norm_type="batchnorm")
    with pytest.raises(ValueError, match="mega_norm='batchnorm' needs causal=False"):
        SpadeConfig.from_preset("mega-chunk", "tiny", mega_norm="batchnorm")


def test_chunks_only_meet_through_the_ema():
    layer = make("chunk", causal=True)
    with torch.no_grad():  # an EMA that passes nothing on: zero output weights and skip
        layer.ema.eta.zero_()
        layer.ema.omega.zero_()
    x = torch.randn(1, 10, 8)
    changed = x.clone()
    changed[0, 2] += 1.0  # a token of the first chunk (positions 0..4)
    a, b = layer(x), layer(changed)
    torch.testing.assert_close(a[0, 5:], b[0, 5:])  # the second chunk does not see it
    assert not torch.allclose(a[0, 2:5], b[0, 2:5])


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    layer = MegaLayer(64, 128, ema=MultiHeadEMA(64), chunk_size=16, z_dim=32)
    for linear in (layer.v_proj, layer.mx_proj, layer.h_proj):
        assert abs(linear.weight.std().item() - 0.02) < 0.003
        assert torch.all(linear.bias == 0)
    assert torch.all(layer.qk_offset == 0)
    assert abs(layer.qk_scale.std().item() - 0.02) < 0.005
    ema = layer.ema  # eta, omega ~ N(0, 1); alpha / delta logits ~ N(0, 0.2^2)
    assert 0.9 < ema.eta.std().item() < 1.1 and 0.7 < ema.omega.std().item() < 1.3
    assert 0.17 < ema.alpha_logit.std().item() < 0.23
    assert 0.17 < ema.delta_logit.std().item() < 0.23
    assert layer.v_dim == 128  # default 2 * d_model
    assert layer.relative_bias.table.shape == (2 * 16 - 1,)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(pattern="diagonal"), ValueError, "pattern must be one of"),
    (dict(chunk_size=None), ValueError, "chunk_size"),
    (dict(z_dim=0), ValueError, "z_dim"),
    (dict(v_dim=-2), ValueError, "v_dim"),
    (dict(norm="middle"), ValueError, "norm must be one of"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(ema=MultiHeadEMA(8, bidirectional=True)), ValueError, "ema.bidirectional must be False"),
    (dict(ema=MultiHeadEMA(6)), ValueError, "d_model=8"),
    (dict(attention_fn="gelu"), ValueError, "attention_fn must be one of"),
    (dict(norm_type="groupnorm"), ValueError, "norm_type must be one of"),
    (dict(relative_bias="rotary", z_dim=5), ValueError, "z_dim must be even, got 5"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(ema=MultiHeadEMA(8), pattern="chunk", chunk_size=4, **{})
    args.update(kwargs)
    with pytest.raises(error, match=match):
        MegaLayer(8, 16, **args)


def test_optimiser_groups_keep_gains_biases_and_ema_dynamics_out_of_weight_decay():
    from spadeformer.training.optim import param_groups

    layer = make("chunk")
    groups = {g["name"]: g for g in param_groups(layer, 1e-3, 0.1, ssm_lr=1e-4)}
    names = {id(p): n for n, p in layer.named_parameters()}
    decayed = {names[id(p)] for g in groups.values() if g["weight_decay"] > 0
               for p in g["params"]}
    assert decayed == {"v_proj.weight", "mx_proj.weight", "h_proj.weight", "ffn.fc1.weight",
                       "ffn.fc2.weight", "ema.eta"}
    ssm = {names[id(p)] for p in groups["ssm"]["params"]}
    assert ssm == {"ema.alpha_logit", "ema.delta_logit", "ema.beta"}
    assert groups["ssm"]["lr"] == 1e-4


def test_hidden_dropout_acts_on_the_values_and_the_ffn_hidden_layer_only():
    layer = make("chunk", dropout=0.3, hidden_dropout=0.0)
    seen = []
    layer.hidden_dropout.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    layer.ffn.hidden_dropout.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    layer.train()(torch.randn(2, 7, 8))
    assert seen == [(2, 7, 10), (2, 7, 16)]  # V (v_dim 10), then the FFN's hidden (d_ff 16)
    assert layer.hidden_dropout.p == layer.ffn.hidden_dropout.p == 0.0
    assert layer.dropout.p == layer.ffn.dropout.p == 0.3
    only_hidden = make("chunk", dropout=0.0, hidden_dropout=0.5).train()
    x = torch.randn(2, 7, 8)
    assert not torch.allclose(only_hidden(x), only_hidden.eval()(x))  # it does drop
    assert make("chunk", dropout=0.2).hidden_dropout.p == 0.2  # None: the one dropout rate
    with pytest.raises(ValueError, match="hidden_dropout must be a number in"):
        make("chunk", hidden_dropout=1.5)


def test_step_refuses_a_state_that_is_not_its_own():
    layer = make("chunk")
    x_t = torch.randn(2, 8)
    ema_state, cache = layer.initial_state(2)
    for bad in (None, cache, (ema_state, None)):
        with pytest.raises(TypeError, match=r"\(EMA state, AttentionCache\) pair"):
            layer.step(x_t, bad)
    with pytest.raises(ValueError, match=r"relative_bias must be one of \['simple', 'rotary'\]"):
        MegaLayer(8, 16, ema=MultiHeadEMA(8), chunk_size=4, relative_bias="no")


def test_full_attention_refuses_lengths_its_bias_cannot_tell_apart():
    layer = make("full", max_positions=6)
    layer(torch.randn(1, 6, 8))  # exactly max_positions: every offset has its own scalar
    with pytest.raises(ValueError, match="sequence length 7 exceeds max_positions=6"):
        layer(torch.randn(1, 7, 8))
    state = layer.initial_state(1)
    for _ in range(6):
        _, state = layer.step(torch.randn(1, 8), state)
    with pytest.raises(ValueError, match="sequence length 7 exceeds max_positions=6"):
        layer.step(torch.randn(1, 8), state)
    make("chunk", max_positions=6)(torch.randn(1, 20, 8))  # chunks never reach that far
    no_bias = make("full", max_positions=6, relative_bias=False)
    no_bias(torch.randn(1, 20, 8))


@pytest.mark.parametrize("pattern", [p for p, _ in PATTERNS])
def test_rotary_bias_block_follows_the_equations_and_decodes(pattern):
    layer = make(pattern, relative_bias="rotary").double()
    assert isinstance(layer.relative_bias, RotaryRelativeBias)
    assert layer.relative_bias.dim == layer.z_dim
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, mega_by_the_equations(layer, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, layer.forward_ref(x), rtol=1e-10, atol=1e-10)
    state = layer.initial_state(2)
    ys = []
    for t in range(13):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-9, atol=1e-9)
    no_bias = copy.deepcopy(layer)
    no_bias.relative_bias = None
    assert not torch.allclose(no_bias(x), y, atol=1e-2)  # the same block but its bias: it counts


def test_rotary_bias_has_no_length_limit():
    layer = make("full", max_positions=6, relative_bias="rotary").double()
    x = torch.randn(1, 20, 8, dtype=torch.float64)  # the simple bias would refuse this
    torch.testing.assert_close(layer(x), mega_by_the_equations(layer, x), rtol=1e-10,
                               atol=1e-10)
    assert make("full", relative_bias=True).relative_bias.__class__ is SimpleRelativeBias
    assert make("full", relative_bias=None).relative_bias is None


def test_step_needs_a_causal_layer():
    layer = make("chunk", causal=False)
    with pytest.raises(RuntimeError, match="causal"):
        layer.initial_state(1)
    with pytest.raises(RuntimeError, match="causal"):
        layer.step(torch.randn(1, 8), None)


# ------------------------------------------------------------------------------- config
def test_presets_build_mega_blocks_in_every_layer():
    cfg = SpadeConfig.from_preset("mega-chunk", "lra")
    assert (cfg.block, cfg.ssm, cfg.attention, cfg.position) == ("mega", "ema", "chunk",
                                                                 "simple")
    assert cfg.global_layers == list(range(cfg.n_layers))
    assert (cfg.mega_z_dim, cfg.mega_v_dim) == (64, 256)  # Mega's LRA widths at d 128
    full = SpadeConfig.from_preset("mega", "tiny", mega_z_dim=8)
    assert full.attention == "full" and full.mega_z_dim == 8
    assert SpadeConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("overrides, match", [
    (dict(global_layers=[0]), "global_layers must be"),
    (dict(attention="none"), "block='mega' needs attention"),
    (dict(position="t5"), "block='mega' takes position"),
    (dict(mega_z_dim=0), "mega_z_dim must be a positive integer"),
    (dict(block="cnn"), "block must be one of"),
])
def test_config_refuses_bad_mega_combinations(overrides, match):
    with pytest.raises(ValueError, match=match):
        SpadeConfig.from_preset("mega-chunk", "tiny", **overrides)


def test_mega_fields_need_block_mega():
    with pytest.raises(ValueError, match="mega_v_dim is only used with block='mega'"):
        SpadeConfig(mega_v_dim=32)
    with pytest.raises(ValueError, match="mega_attention_fn is only used with block='mega'"):
        SpadeConfig(mega_attention_fn="laplace")
    with pytest.raises(ValueError, match="mega_norm is only used with block='mega'"):
        SpadeConfig(mega_norm="scalenorm")
    with pytest.raises(ValueError, match="mega_hidden_dropout is only used with block='mega'"):
        SpadeConfig(mega_hidden_dropout=0.0)
    with pytest.raises(ValueError, match="mega_hidden_dropout must be a number in"):
        SpadeConfig.from_preset("mega-chunk", "tiny", mega_hidden_dropout=1.0)
    with pytest.raises(ValueError, match="position='simple'.*needs block='mega'"):
        SpadeConfig(position="simple")
    with pytest.raises(ValueError, match="position='rotary'.*needs block='mega'"):
        SpadeConfig(position="rotary")


def test_config_rotary_bias_reaches_every_block():
    from spadeformer.models import SpadeForCausalLM

    cfg = SpadeConfig.from_preset("mega", "tiny", position="rotary", max_position=16)
    assert cfg.position_limit is None  # rotary tells every offset apart
    blocks = [m for m in SpadeForCausalLM(cfg).modules() if isinstance(m, MegaLayer)]
    assert len(blocks) == cfg.n_layers
    assert all(isinstance(m.relative_bias, RotaryRelativeBias) for m in blocks)
    assert SpadeConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="mega_z_dim must be even, got 7"):
        SpadeConfig.from_preset("mega", "tiny", position="rotary", mega_z_dim=7)


def test_config_options_that_mega_blocks_do_not_have():
    # one head per block: n_heads need not divide d_model (it does for Transformer blocks)
    mega = SpadeConfig.from_preset("mega-chunk", "tiny", d_model=30, n_heads=4)
    assert mega.block == "mega"
    with pytest.raises(ValueError, match="must be divisible by n_heads"):
        SpadeConfig.from_preset("spade-s4-chunk", "tiny", d_model=30, n_heads=4)
    for overrides in (dict(combine="add"), dict(add_weight=0.3)):  # a warning: old configs load
        with pytest.warns(UserWarning, match="Mega block has neither.*are ignored"):
            SpadeConfig.from_preset("mega-chunk", "tiny", **overrides)
    with pytest.raises(ValueError, match="mega_attention_fn must be one of"):
        SpadeConfig.from_preset("mega-chunk", "tiny", mega_attention_fn="tanh")
    for norm in ("batchnorm", "syncbatchnorm"):  # statistics over positions: not causal
        with pytest.raises(ValueError, match=f"mega_norm='{norm}' needs causal=False"):
            SpadeConfig.from_preset("mega-chunk", "tiny", mega_norm=norm)
        with pytest.raises(ValueError, match=f"norm_type='{norm}' needs causal=False"):
            MegaLayer(8, 16, ema=MultiHeadEMA(8), chunk_size=4, norm_type=norm)
    cfg = SpadeConfig.from_preset("mega-chunk", "tiny", causal=False, mega_norm="syncbatchnorm")
    from spadeformer.models import SpadeForSequenceClassification

    norms = [m for m in SpadeForSequenceClassification(cfg).modules()
             if isinstance(m, MaskedBatchNorm)]
    assert len(norms) == 2 * cfg.n_layers + 1 and all(n.sync for n in norms)


def test_config_attention_fn_and_norm_reach_every_block():
    from spadeformer.layers import ScaleNorm
    from spadeformer.models import SpadeForCausalLM

    cfg = SpadeConfig.from_preset("mega-chunk", "tiny", mega_attention_fn="laplace",
                                  mega_norm="scalenorm", mega_hidden_dropout=0.0, dropout=0.1)
    model = SpadeForCausalLM(cfg)
    blocks = [m for m in model.modules() if isinstance(m, MegaLayer)]
    assert len(blocks) == cfg.n_layers
    assert {m.attention_fn for m in blocks} == {"laplace"}
    assert {(m.hidden_dropout.p, m.dropout.p) for m in blocks} == {(0.0, 0.1)}
    norms = [n for m in blocks for n in (m.norm_mix, m.norm_ffn)]
    assert all(isinstance(n, ScaleNorm) for n in [*norms, model.backbone.final_norm])
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert SpadeConfig.from_json(cfg.to_json()) == cfg


def test_position_limit_names_what_bounds_the_length():
    assert SpadeConfig.from_preset("mega", "tiny", max_position=64).position_limit == 64
    assert SpadeConfig.from_preset("mega-chunk", "tiny").position_limit is None
    assert SpadeConfig.from_preset("mega", "tiny", position="none").position_limit is None
    assert SpadeConfig(position="learned", max_position=32).position_limit == 32
    assert SpadeConfig().position_limit is None


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - want).norm() / want.norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern, attention_fn, bias", [
    ("chunk", "laplace", "rotary"), ("chunk", "softmax", "rotary"),
    ("full", "softmax", "simple"), ("window", "relu2", "simple")])
def test_mega_block_on_cuda_matches_cpu_fp64(pattern, attention_fn, bias):
    """Runs only where a GPU is present (benchmarks/gpu_check.sh): the CUDA paths (FlexAttention
    for softmax, the blocked element path, the rotary bias) in fp32 and bf16 autocast against
    the same block in fp64 on the CPU, values and gradients. FlexAttention must not have
    fallen back to SDPA (it warns and marks itself broken when it does)."""
    from spadeformer.ops import flex_attn

    flex_attn._broken.clear()
    sizes = {"chunk": dict(chunk_size=64), "window": dict(window_size=32), "full": {}}[pattern]
    torch.manual_seed(0)
    layer = MegaLayer(64, 128, ema=MultiHeadEMA(64, n_dims=4), pattern=pattern, z_dim=32,
                      v_dim=64, relative_bias=bias, attention_fn=attention_fn, **sizes)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 300, 64)
    ref = copy.deepcopy(layer).double()
    x_ref = x.double().requires_grad_()
    y_ref = ref(x_ref)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, *ref.parameters()])
    gpu = copy.deepcopy(layer).cuda()
    x_gpu = x.cuda().requires_grad_()
    y = gpu(x_gpu)
    grads = torch.autograd.grad(y.square().sum(), [x_gpu, *gpu.parameters()])
    assert _relative_error(y, y_ref.detach()) < 1e-4
    for got, want in zip(grads, grads_ref, strict=True):
        assert _relative_error(got, want) < 1e-3
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_bf16 = gpu(x_gpu)
        grads_bf16 = torch.autograd.grad(y_bf16.float().square().sum(), [x_gpu])
    assert _relative_error(y_bf16, y_ref.detach()) < 3e-2
    assert _relative_error(grads_bf16[0], grads_ref[0]) < 5e-2
    assert not flex_attn._broken
