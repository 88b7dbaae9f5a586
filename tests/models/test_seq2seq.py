"""SpadeForConditionalGeneration (the paper's encoder-decoder, Sec. 5.1) and cross-attention."""

import pytest
import torch
import torch.nn.functional as F

from spadeformer import CrossAttention, SpadeConfig
from spadeformer.models import (
    SpadeForConditionalGeneration,
    SpadeForSequenceClassification,
    load_pretrained_weights,
)
from spadeformer.models.seq2seq import shift_right

VOCAB = 37


def tiny(system="spade-s4-window", **overrides):
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, window_size=4, chunk_size=4,
                dropout=0.0, causal=False, n_decoder_layers=2)
    base.update(overrides)
    return SpadeConfig.from_preset(system, size="tiny", **base)


def stepped_logits(model, src, decoder_ids, padding_mask=None):
    memory, mask = model.encode(src, padding_mask)
    state = model.initial_state(memory, mask)
    out = []
    for t in range(decoder_ids.shape[1]):
        logits, state = model.step(decoder_ids[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1)


def test_cross_attention_equals_its_reference_with_padding():
    attn = CrossAttention(16, 4)
    x, memory = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:], mask[2, :2] = True, True
    torch.testing.assert_close(attn(x, memory, mask), attn.forward_ref(x, memory, mask))
    # a padded source token changes nothing; a real one does
    other = memory.clone()
    other[1, 5] += 1.0
    torch.testing.assert_close(attn(x, other, mask), attn(x, memory, mask))
    other[1, 0] += 1.0
    assert not torch.allclose(attn(x, other, mask)[1], attn(x, memory, mask)[1])
    mask[0] = True
    with pytest.raises(ValueError, match="pads every source token of rows \\[0\\]"):
        attn(x, memory, mask)


@pytest.mark.parametrize("system,overrides", [
    ("spade-s4-window", {}), ("spade-s4-window", {"norm": "post"}),
    ("spade-s4-chunk", {"position": "t5"}), ("transformer-full", {}),
    ("transformer-window", {"position": "learned", "max_position": 16}),
    ("transformer-relative", {}),
])
def test_step_equals_decode(system, overrides):
    model = SpadeForConditionalGeneration(tiny(system, **overrides)).eval()
    src, tgt = torch.randint(1, VOCAB, (2, 9)), torch.randint(1, VOCAB, (2, 6))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    memory, memory_mask = model.encode(src, mask)
    torch.testing.assert_close(stepped_logits(model, src, tgt, mask),
                               model.decode(tgt, memory, memory_mask), rtol=1e-4, atol=1e-5)


def test_teacher_forcing_loss_and_shift():
    model = SpadeForConditionalGeneration(tiny(decoder_start_token_id=3)).eval()
    src = torch.randint(1, VOCAB, (2, 8))
    labels = torch.randint(1, VOCAB, (2, 5))
    labels[1, 3:] = -100  # a shorter target, padded
    shifted = shift_right(labels, 3, pad_token_id=0)
    assert shifted[:, 0].tolist() == [3, 3] and shifted[0, 1:].tolist() == labels[0, :4].tolist()
    assert shifted[1, 4] == 0  # an ignored label reads as the pad id
    out = model(src, labels=labels)  # no pad_token_id: ignored labels read as the start id
    torch.testing.assert_close(
        out.logits, model(src, decoder_input_ids=shift_right(labels, 3, 3)).logits)
    keep = labels != -100
    manual = F.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, manual)
    # what the decoder reads behind an ignored label only reaches ignored positions
    torch.testing.assert_close(model(src, decoder_input_ids=shifted, labels=labels).loss,
                               out.loss)


def test_encoder_sees_the_whole_source_and_the_decoder_only_the_past():
    model = SpadeForConditionalGeneration(tiny()).eval()
    src, tgt = torch.randint(1, VOCAB, (1, 12)), torch.randint(1, VOCAB, (1, 6))
    base = model(src, decoder_input_ids=tgt).logits
    late_src = src.clone()
    late_src[0, -1] = (src[0, -1] % (VOCAB - 1)) + 1
    assert not torch.allclose(model(late_src, decoder_input_ids=tgt).logits[:, 0], base[:, 0])
    later_tgt = tgt.clone()
    later_tgt[0, 4] = (tgt[0, 4] % (VOCAB - 1)) + 1
    changed = model(src, decoder_input_ids=later_tgt).logits
    torch.testing.assert_close(changed[:, :4], base[:, :4])
    assert not torch.allclose(changed[:, 4:], base[:, 4:])


def test_padded_source_equals_the_unpadded_one():
    model = SpadeForConditionalGeneration(tiny(pad_token_id=0)).eval()
    src, tgt = torch.randint(1, VOCAB, (1, 7)), torch.randint(1, VOCAB, (1, 4))
    padded = torch.cat([src, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, decoder_input_ids=tgt).logits,  # mask from pad id
                               model(src, decoder_input_ids=tgt).logits, rtol=1e-4, atol=1e-5)


def test_greedy_generate_equals_argmax_of_decode():
    model = SpadeForConditionalGeneration(tiny(decoder_start_token_id=1)).eval()
    src = torch.randint(1, VOCAB, (2, 10))
    out = model.generate(src, 6, temperature=0)
    assert out.shape == (2, 6)
    ids = torch.full((2, 1), 1)
    for _ in range(6):  # the slow way: re-run the whole decoder for every token
        logits = model(src, decoder_input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids[:, 1:].tolist()
    same = model.generate(src, 6, temperature=1.0, seed=3)
    assert same.tolist() == model.generate(src, 6, temperature=1.0, seed=3).tolist()


def test_save_load_and_start_the_encoder_from_a_classifier(tmp_path):
    model = SpadeForConditionalGeneration(tiny())
    model.save_pretrained(tmp_path / "s2s")
    loaded = SpadeForConditionalGeneration.from_pretrained(tmp_path / "s2s").eval()
    src, tgt = torch.randint(1, VOCAB, (1, 6)), torch.randint(1, VOCAB, (1, 3))
    torch.testing.assert_close(loaded(src, decoder_input_ids=tgt).logits,
                               model.eval()(src, decoder_input_ids=tgt).logits)
    assert loaded.lm_head.weight is loaded.backbone.embed.weight  # tying survives
    clf = SpadeForSequenceClassification(tiny())
    clf.save_pretrained(tmp_path / "clf")
    fresh = SpadeForConditionalGeneration(tiny())
    report = load_pretrained_weights(fresh, tmp_path / "clf")
    assert all(not n.startswith("backbone.") for n in report["fresh"])
    assert any(n.startswith("decoder_layers.") for n in report["fresh"])
    for name, tensor in fresh.backbone.state_dict().items():
        torch.testing.assert_close(tensor, clf.backbone.state_dict()[name], rtol=0, atol=0)


def test_frozen_s4_encoder_trains_only_the_rest():
    model = SpadeForConditionalGeneration(tiny(ssm_options={"trainable": False}))
    ssm = model.backbone.layers[0].ssm
    assert sum(p.numel() for p in ssm.parameters() if p.requires_grad) == 0
    out = model(torch.randint(1, VOCAB, (2, 8)), labels=torch.randint(0, VOCAB, (2, 4)))
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(model.get_parameter(n).grad is not None for n in trainable)


def test_t5_base_size():
    # T5-base's shape with its 32,128-token vocabulary, tied: T5-base's own ~223M plus the
    # global layer's mixing projection and frozen S4.
    cfg = SpadeConfig.from_preset("spade-s4-window", size="t5-base", causal=False)
    with torch.device("meta"):
        model = SpadeForConditionalGeneration(cfg)
    d, ff, layers, vocab = 768, 3072, 12, 32_128
    attention, ffn, norm = 4 * (d * d + d), 2 * d * ff + d + ff, 2 * d
    encoder = layers * (attention + ffn + 2 * norm) + vocab * d
    decoder = layers * (2 * attention + ffn + 3 * norm)
    n = model.num_parameters()
    assert encoder + decoder < n < encoder + decoder + 3_000_000, n
    assert cfg.norm == "post" and cfg.position == "t5" and cfg.n_decoder_layers == 12


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="causal=False"):
        SpadeForConditionalGeneration(tiny(causal=True))
    with pytest.raises(ValueError, match=r"decoder attention has n_heads heads: d_model \(30\)"):
        SpadeForConditionalGeneration(tiny("mega-chunk", d_model=30))  # a Mega encoder is fine
    with pytest.raises(ValueError, match="decoder_start_token_id must be an integer in"):
        tiny(decoder_start_token_id=VOCAB)
    with pytest.raises(ValueError, match="n_decoder_layers must be a positive integer"):
        tiny(n_decoder_layers=0)
    model = SpadeForConditionalGeneration(tiny())
    src = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="labels .* or decoder_input_ids"):
        model(src)
    with pytest.raises(ValueError, match="labels must hold ids in"):
        model(src, labels=torch.full((2, 3), VOCAB))
    with pytest.raises(ValueError, match="batch 1 but the source has batch 2"):
        model(src, decoder_input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(src, -1)


def test_generate_keeps_the_modules_mode_and_checks_its_arguments_first():
    model = SpadeForConditionalGeneration(tiny(dropout=0.2, max_position=6,
                                               position="learned", system="transformer-window"))
    src = torch.randint(1, VOCAB, (2, 5))
    for mode in (False, True):
        model.train(mode)
        model.generate(src, 3, temperature=0)
        assert model.training is mode and all(m.training is mode for m in model.modules())
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="at most 6"):  # refused before encoding the source
        model.generate(src, 8)
    with pytest.raises(ValueError, match="eos_token_id must be None or an id in"):
        model.generate(src, 2, eos_token_id=VOCAB)
    assert calls == []


def test_errors_name_the_argument_the_caller_passed():
    model = SpadeForConditionalGeneration(tiny())
    src = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model(src, labels=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"padding_mask pads every source token of rows \[1\]"):
        model(src, labels=torch.ones(2, 3, dtype=torch.long),
              padding_mask=torch.tensor([[False] * 5, [True] * 5]))
