"""Adaptive input + adaptive softmax (Baevski & Auli 2019) and their wiring into the LM."""

import math

import pytest
import torch
import torch.nn.functional as F

from spadeformer.config import SpadeConfig
from spadeformer.models import SpadeForCausalLM
from spadeformer.models.adaptive import (
    AdaptiveInput,
    AdaptiveSoftmax,
    adaptive_input_ref,
    adaptive_loss_ref,
)

V, D, CUTOFFS, FACTOR = 37, 32, [8, 20], 2.0  # bands [0, 8), [8, 20), [20, 37); dims 32, 16, 8


def tiny(system="spade-s4-window", **overrides):
    base = dict(vocab_size=V, d_model=D, n_heads=4, d_ff=64, window_size=4, chunk_size=4,
                dropout=0.0, adaptive_cutoffs=CUTOFFS, adaptive_factor=FACTOR)
    base.update(overrides)
    return SpadeConfig.from_preset(system, size="tiny", **base)


def targets_in_every_band(n: int) -> torch.Tensor:
    """n targets with every band (and both edges of every band) represented, then random."""
    edges = torch.tensor([0, 7, 8, 19, 20, 36])
    return torch.cat([edges, torch.randint(0, V, (n - len(edges),))])


def softmax_pair(tied: bool, dtype=torch.float64):
    emb = AdaptiveInput(V, D, CUTOFFS, FACTOR).to(dtype)
    return emb, AdaptiveSoftmax(D, V, CUTOFFS, FACTOR, tie_to=emb if tied else None).to(dtype)


# ------------------------------------------------------------------ modules


def test_band_widths_follow_the_factor():
    emb = AdaptiveInput(V, D, CUTOFFS, FACTOR)
    assert emb.dims == [32, 16, 8]
    assert [tuple(e.weight.shape) for e in emb.embeddings] == [(8, 32), (12, 16), (17, 8)]
    assert [tuple(p.weight.shape) for p in emb.projections] == [(32, 32), (32, 16), (32, 8)]


def test_adaptive_input_equals_dense_ref_values_and_grads():
    emb = AdaptiveInput(V, D, CUTOFFS, FACTOR)
    ids = targets_in_every_band(30).view(5, 6)
    out = emb(ids)
    ref = adaptive_input_ref(emb, ids)
    assert out.shape == (5, 6, D)
    # fp32, same products in a different grouping (per band vs dense table): rounding only
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), list(emb.parameters()))
    grads_ref = torch.autograd.grad((ref * w).sum(), list(emb.parameters()))
    for g, r in zip(grads, grads_ref, strict=True):
        assert g.abs().sum() > 0  # every band was hit
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_equals_ref_with_ignored_rows(tied):
    _, sm = softmax_pair(tied)
    h = torch.randn(40, D, dtype=torch.float64)
    target = targets_in_every_band(40)
    target[[3, 11, 25]] = -100
    loss = sm.loss(h, target)
    # float64 end to end: the efficient path and the full log_prob agree to rounding
    torch.testing.assert_close(loss, adaptive_loss_ref(sm, h, target), rtol=1e-12, atol=1e-12)
    keep = target != -100
    by_hand = -sm.log_prob(h[keep]).gather(1, target[keep][:, None]).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(loss, list(sm.parameters()))
    g_ref = torch.autograd.grad(adaptive_loss_ref(sm, h, target), list(sm.parameters()))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_log_prob_is_normalised(tied):
    _, sm = softmax_pair(tied, dtype=torch.float32)
    h = 3 * torch.randn(4, 7, D)  # any leading shape
    lp = sm.log_prob(h)
    assert lp.shape == (4, 7, V) and lp.dtype == torch.float32
    # fp32 logsumexp over 37 terms of O(1) log-probs: ~1e-7 rounding
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(4, 7), rtol=0, atol=1e-5)
    assert (lp <= 0).all()


def test_matches_torch_adaptive_log_softmax():
    """An independent reference: torch.nn.AdaptiveLogSoftmaxWithLoss has the same two-level
    factorisation (head = shortlist + cluster logits, tail = Linear(d -> d_i) -> Linear(d_i ->
    n_i)); copy our untied weights into it and compare."""
    _, sm = softmax_pair(tied=False)
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(D, V, CUTOFFS, div_value=FACTOR,
                                              head_bias=False).double()
    with torch.no_grad():
        ref.head.weight.copy_(torch.cat([sm.head_weight, sm.cluster.weight]))
        for i, tail in enumerate(ref.tail):
            tail[0].weight.copy_(sm.tail_proj[i].T)
            tail[1].weight.copy_(sm.tail_weight[i])
    h = torch.randn(25, D, dtype=torch.float64)
    target = targets_in_every_band(25)
    torch.testing.assert_close(sm.log_prob(h), ref.log_prob(h), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sm.loss(h, target), ref(h, target).loss, rtol=1e-12, atol=1e-12)


def test_loss_scores_each_tail_only_for_its_own_rows(monkeypatch):
    _, sm = softmax_pair(tied=True)
    seen = []
    original = sm._tail_log_prob
    monkeypatch.setattr(sm, "_tail_log_prob",
                        lambda i, h: seen.append((i, h.shape[0])) or original(i, h))
    monkeypatch.setattr(sm, "log_prob", lambda h: pytest.fail("loss must not build log_prob"))
    h = torch.randn(10, D, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 9, 9, 9, 4, 5, -100])  # head words and band 1 only
    sm.loss(h, target)
    assert seen == [(1, 3), (2, 0)]  # band 2 has no target: zero rows (kept in the graph)


def test_tied_parameters_are_the_same_tensors():
    emb, sm = softmax_pair(tied=True, dtype=torch.float32)
    assert sm.head_weight is emb.embeddings[0].weight
    for i in range(2):
        assert sm.tail_proj[i] is emb.projections[i + 1].weight
        assert sm.tail_weight[i] is emb.embeddings[i + 1].weight
    model = SpadeForCausalLM(tiny())
    embed, head = model.backbone.embed, model.lm_head
    assert head.head_weight is embed.embeddings[0].weight
    assert all(head.tail_proj[i] is embed.projections[i + 1].weight for i in range(2))
    assert all(head.tail_weight[i] is embed.embeddings[i + 1].weight for i in range(2))
    untied = SpadeForCausalLM(tiny(tie_embeddings=False))
    shared = sum(p.numel() for p in [*embed.embeddings.parameters(),
                                     *embed.projections[1:].parameters()])
    assert untied.num_parameters() - model.num_parameters() == shared


def test_module_errors_name_the_argument():
    with pytest.raises(ValueError, match="cutoffs must be strictly increasing"):
        AdaptiveInput(V, D, [20, 8])
    with pytest.raises(ValueError, match=r"cutoffs must all lie in \(0, vocab_size=37\)"):
        AdaptiveSoftmax(D, V, [8, 37])
    with pytest.raises(ValueError, match="factor must be a number >= 1"):
        AdaptiveInput(V, D, CUTOFFS, factor=0.5)
    with pytest.raises(ValueError, match="tie_to must have the same"):
        AdaptiveSoftmax(D, V, [8, 21], FACTOR, tie_to=AdaptiveInput(V, D, CUTOFFS, FACTOR))
    sm = AdaptiveSoftmax(D, V, CUTOFFS, FACTOR)
    with pytest.raises(ValueError, match=r"target must hold ids in \[0, vocab_size=37\)"):
        sm.loss(torch.randn(2, D), torch.tensor([0, 37]))
    with pytest.raises(ValueError, match="h must have shape"):
        sm.loss(torch.randn(2, D + 1), torch.tensor([0, 1]))


# ------------------------------------------------------------------ in the model


@pytest.mark.parametrize("system", ["spade-s4-window", "transformer-full"])
def test_causal_lm_forward_backward(system):
    model = SpadeForCausalLM(tiny(system))
    ids = targets_in_every_band(22).view(2, 11)
    labels = torch.randint(0, V, (2, 11))
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    assert out.logits is None  # adaptive + labels: the cheap path by default
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # Asking for both: logits are log-probabilities and the loss is their NLL.
    both = model(ids, labels=labels, return_logits=True)
    assert both.logits.shape == (2, 11, V)
    torch.testing.assert_close(both.logits.logsumexp(-1), torch.zeros(2, 11), rtol=0, atol=1e-5)
    ref = F.cross_entropy(both.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(both.loss, ref, rtol=1e-5, atol=1e-6)  # fp32 rounding
    assert model(ids).logits.shape == (2, 11, V)  # no labels: logits by default
    assert model(ids, labels=labels, return_logits=False).logits is None


@pytest.mark.parametrize("tied", [True, False])
def test_bands_without_tokens_still_get_gradients(tied):
    """DistributedDataParallel needs every trainable parameter in each step's graph: a batch
    of head words only (no token of a tail band) must still give every band a (zero) grad."""
    model = SpadeForCausalLM(tiny(tie_embeddings=tied))
    ids = torch.randint(0, CUTOFFS[0], (2, 11))  # band 0 only, as inputs and as targets
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    tail = model.backbone.embed.embeddings[2].weight.grad
    assert tail is not None and tail.abs().max() == 0
    empty = model.backbone.embed(torch.zeros(0, 3, dtype=torch.long))  # no tokens at all
    assert empty.shape == (0, 3, D)


def test_adaptive_input_is_scaled_by_sqrt_d():
    model = SpadeForCausalLM(tiny()).eval()
    ids = targets_in_every_band(12).view(2, 6)
    torch.testing.assert_close(model.backbone._embed(ids),
                               model.backbone.embed(ids) * math.sqrt(D))


def test_plain_head_return_logits_flag():
    model = SpadeForCausalLM(tiny(adaptive_cutoffs=None))
    ids = torch.randint(0, V, (2, 5))
    assert model(ids, labels=ids).logits.shape == (2, 5, V)  # free with the plain head
    out = model(ids, labels=ids, return_logits=False)
    assert out.logits is None and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="return_logits must be None, True or False"):
        model(ids, return_logits="yes")


def test_step_equals_forward_log_probs(stepwise_logits):
    model = SpadeForCausalLM(tiny("spade-s4-window")).eval()
    ids = targets_in_every_band(20).view(2, 10)
    # fp32; the SSM recurrence and FFT convolution round differently (as in test_models.py)
    torch.testing.assert_close(stepwise_logits(model, ids), model(ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_generate_greedy_follows_argmax_of_forward():
    model = SpadeForCausalLM(tiny("spade-s4-window")).eval()
    prompt = torch.randint(0, V, (2, 4))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 10) and out.min() >= 0 and out.max() < V
    assert torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        lp = model(out[:, :-1]).logits  # teacher-forced on the generated sequence
    assert torch.equal(out[:, 4:], lp[:, 3:].argmax(-1))
    sampled = model.generate(prompt, max_new_tokens=3, temperature=1.0, top_k=5, seed=0)
    assert sampled.shape == (2, 7)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, tied):
    model = SpadeForCausalLM(tiny(tie_embeddings=tied)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = SpadeForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    ids = targets_in_every_band(18).view(2, 9)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    head, embed = loaded.lm_head, loaded.backbone.embed
    assert (head.head_weight is embed.embeddings[0].weight) == tied  # tying survives


def test_bf16_autocast_loss_close_to_fp32():
    model = SpadeForCausalLM(tiny("transformer-full")).eval()
    ids = targets_in_every_band(16).view(2, 8)
    labels = torch.randint(0, V, (2, 8))
    ref = model(ids, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels, return_logits=True)
    assert out.loss.dtype == torch.float32 and out.logits.dtype == torch.float32
    # bf16 matmuls (8-bit mantissa) over a 2-layer net: a few 1e-2 on a loss of ~ln 37
    torch.testing.assert_close(out.loss, ref, rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------ config


def test_wikitext103_preset_is_adaptive_and_round_trips():
    cfg = SpadeConfig.from_preset("spade-s4-window", size="wikitext103")
    assert cfg.adaptive_cutoffs == [20_000, 60_000] and cfg.adaptive_factor == 4.0
    assert cfg.tie_embeddings
    assert SpadeConfig.from_json(cfg.to_json()) == cfg
    cfg.adaptive_cutoffs.append(70_000)  # a config owns its list: the preset is untouched
    assert SpadeConfig.from_preset("transformer-full", size="wikitext103").adaptive_cutoffs == [
        20_000, 60_000]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(adaptive_cutoffs=[20, 8]), "adaptive_cutoffs must be strictly increasing"),
        (dict(adaptive_cutoffs=[8, 8]), "adaptive_cutoffs must be strictly increasing"),
        (dict(adaptive_cutoffs=[0, 8]), r"adaptive_cutoffs must all lie in \(0, vocab_size"),
        (dict(adaptive_cutoffs=[8, 37]), r"adaptive_cutoffs must all lie in \(0, vocab_size"),
        (dict(adaptive_cutoffs=[]), "adaptive_cutoffs must be a non-empty list"),
        (dict(adaptive_cutoffs=[8, 2.5]), "adaptive_cutoffs must be a non-empty list"),
        (dict(adaptive_cutoffs=8), "adaptive_cutoffs must be a non-empty list"),
        (dict(adaptive_factor=0.5), "adaptive_factor must be a number >= 1"),
        (dict(adaptive_factor=True), "adaptive_factor must be a number >= 1"),
        (dict(adaptive_cutoffs=None, adaptive_factor=0), "adaptive_factor must be a number >= 1"),
        (dict(adaptive_cutoffs=[1, 2, 3, 4, 5, 6], adaptive_factor=2.0),
         "makes the last band's width"),
        (dict(adaptive_dropout=1.0), "adaptive_dropout must be a number in"),
    ],
)
def test_config_validation_names_the_field(overrides, match):
    base = dict(vocab_size=V, d_model=D, n_heads=4)
    base.update(overrides)
    with pytest.raises(ValueError, match=match):
        SpadeConfig(**base)
