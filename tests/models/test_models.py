"""Every preset: builds, runs forward + backward, no future leak, step == forward, save/load."""

import pytest
import torch

from spadeformer.config import SYSTEMS, SpadeConfig
from spadeformer.models import (
    ModelLoadError,
    SpadeForCausalLM,
    SpadeForRetrieval,
    SpadeForSequenceClassification,
)

ALL_SYSTEMS = sorted(SYSTEMS)


def tiny(system, **overrides):
    base = dict(vocab_size=37, d_model=32, n_heads=4, d_ff=64, window_size=4, chunk_size=4,
                dropout=0.0)
    base.update(overrides)
    return SpadeConfig.from_preset(system, size="tiny", **base)


@pytest.mark.parametrize("system", ALL_SYSTEMS)
def test_preset_forward_backward(system):
    model = SpadeForCausalLM(tiny(system))
    ids = torch.randint(0, 37, (2, 11))
    out = model(ids, labels=torch.randint(0, 37, (2, 11)))
    assert out.logits.shape == (2, 11, 37)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("system", ALL_SYSTEMS)
def test_no_future_leak(system):
    model = SpadeForCausalLM(tiny(system)).eval()
    ids = torch.randint(0, 37, (1, 13))
    t = 7
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 37
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("system", ALL_SYSTEMS)
def test_step_decoding_equals_forward(system, stepwise_logits):
    model = SpadeForCausalLM(tiny(system)).eval()
    ids = torch.randint(0, 37, (2, 10))
    # fp32; the SSM recurrence and FFT convolution round differently: 1e-4 relative to O(1)
    torch.testing.assert_close(stepwise_logits(model, ids), model(ids).logits,
                               rtol=1e-4, atol=1e-4)


# Mega's reference variants: element-wise attention with other norms (configs/README)
MEGA_VARIANTS = [dict(mega_attention_fn="laplace", mega_norm="scalenorm"),
                 dict(mega_attention_fn="relu2", mega_norm="rmsnorm", mega_hidden_dropout=0.0),
                 dict(position="rotary")]


@pytest.mark.parametrize("variant", MEGA_VARIANTS)
@pytest.mark.parametrize("system", ["mega", "mega-chunk"])
def test_mega_variants_step_decoding_equals_forward(system, variant, stepwise_logits):
    model = SpadeForCausalLM(tiny(system, **variant)).eval()
    ids = torch.randint(0, 37, (2, 10))
    torch.testing.assert_close(stepwise_logits(model, ids), model(ids).logits,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("system, overrides", [
    ("spade-s4-window", {}), ("transformer-chunk", {}), ("s4", {}), ("mega", {}),
    ("mega-chunk", MEGA_VARIANTS[0]),
    ("mega-chunk", dict(mega_attention_fn="laplace", mega_norm="batchnorm"))])
def test_bidirectional_classifier_and_padding(system, overrides):
    cfg = tiny(system, causal=False, num_labels=3, **overrides)
    model = SpadeForSequenceClassification(cfg)
    ids = torch.randint(0, 37, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 9:] = True
    with torch.no_grad():  # one training pass: batch norm's running averages move off 0 / 1
        model(ids * 3 % 37, padding_mask=mask)
    model.eval()
    out = model(ids, labels=torch.tensor([0, 2]), padding_mask=mask)
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    ids2 = ids.clone()
    ids2[0, 9:] = (ids[0, 9:] + 5) % 37  # values at padded positions must not matter
    torch.testing.assert_close(model(ids2, padding_mask=mask).logits, out.logits)


def test_pool_takes_real_positions_wherever_the_padding_is():
    from spadeformer.models.heads import pool

    h = torch.arange(6.0).view(1, 6, 1).expand(4, 6, 1)  # hidden value = position
    mask = torch.tensor([[False, False, False, False, True, True],  # right padding
                         [True, True, False, False, False, False],  # left padding
                         [True, False, True, False, True, True],  # gaps
                         [True, True, True, True, True, True]])  # nothing real
    assert pool(h, mask, "first").flatten().tolist() == [0.0, 2.0, 1.0, 0.0]
    assert pool(h, mask, "last").flatten().tolist() == [3.0, 5.0, 3.0, 0.0]
    assert pool(h, mask, "mean").flatten().tolist() == [1.5, 3.5, 2.0, 0.0]


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
@pytest.mark.parametrize("causal", [True, False])
def test_classifier_padded_rows_equal_the_unpadded_sequences(pooling, causal):
    # SPADE has no position embedding (the SSM gives position), so left padding changes nothing
    cfg = tiny("spade-s4-window", causal=causal, num_labels=3, pooling=pooling)
    model = SpadeForSequenceClassification(cfg).double().eval()
    ids = torch.randint(1, 37, (2, 7))
    padded = torch.zeros(2, 11, dtype=torch.long)
    padded[0, :7], padded[1, 4:] = ids[0], ids[1]  # right, left padding
    mask = padded == 0
    with torch.no_grad():
        got = model(padded, padding_mask=mask).logits
        expected = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # config.pad_token_id marks the padding when no mask is passed
    model.config.pad_token_id = 0
    with torch.no_grad():
        torch.testing.assert_close(model(padded).logits, expected, rtol=1e-9, atol=1e-9)


def test_pad_token_id_leaves_the_causal_lm_alone():
    # step() cannot skip tokens, so the LM's forward must not treat any id as padding
    model = SpadeForCausalLM(tiny("spade-s4-window")).eval()
    ids = torch.tensor([[3, 5, 7, 5, 9]])
    with torch.no_grad():
        before = model(ids).logits
        model.config.pad_token_id = 5
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_retrieval_two_towers():
    model = SpadeForRetrieval(tiny("spade-s4-window", causal=False)).eval()
    a, b = torch.randint(0, 37, (3, 9)), torch.randint(0, 37, (3, 12))
    out = model(a, b, labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)


def test_global_layer_is_where_config_says():
    from spadeformer.layers import GlobalLayer, LocalLayer

    model = SpadeForCausalLM(tiny("spade-s4-window", n_layers=3, global_layers=[0, 2]))
    kinds = [type(layer) for layer in model.backbone.layers]
    assert kinds == [GlobalLayer, LocalLayer, GlobalLayer]


def test_frozen_s4_has_no_trainable_parameters():
    cfg = tiny("spade-s4-window", ssm_options={"trainable": False})
    model = SpadeForCausalLM(cfg)
    ssm = model.backbone.layers[0].ssm
    assert sum(p.numel() for p in ssm.parameters() if p.requires_grad) == 0


@pytest.mark.parametrize("system", ["spade-s4-window", "spade-s5-window", "transformer-relative"])
def test_save_load_round_trip(tmp_path, system):
    model = SpadeForCausalLM(tiny(system)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = SpadeForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.backbone.embed.weight  # tying survives


def test_load_in_a_chosen_dtype(tmp_path):
    model = SpadeForCausalLM(tiny("spade-s4-window")).eval()
    model.save_pretrained(tmp_path / "m")
    half = SpadeForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.backbone.embed.weight.dtype == torch.bfloat16
    assert {p.dtype for p in half.backbone.layers[0].ssm.parameters()} == {torch.float32}
    torch.testing.assert_close(half.backbone.embed.weight, model.backbone.embed.weight.bfloat16(),
                               rtol=0, atol=0)
    ids = torch.randint(0, 37, (1, 9))
    assert half(ids).logits.dtype == torch.bfloat16
    # saved in bfloat16, loaded by default into float32
    half.save_pretrained(tmp_path / "h")
    assert SpadeForCausalLM.from_pretrained(tmp_path / "h").backbone.embed.weight.dtype == (
        torch.float32)
    with pytest.raises(ValueError, match="dtype must be None or a floating torch.dtype"):
        SpadeForCausalLM.from_pretrained(tmp_path / "m", dtype="bf16")


def test_save_overwrites_atomically(tmp_path):
    m1 = SpadeForCausalLM(tiny("transformer-window"))
    m1.save_pretrained(tmp_path / "m")
    m2 = SpadeForCausalLM(tiny("transformer-window"))
    m2.save_pretrained(tmp_path / "m")
    loaded = SpadeForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.backbone.embed.weight, m2.backbone.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind


def test_save_into_a_directory_keeps_its_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    model = SpadeForCausalLM(tiny("transformer-window"))
    assert model.save_pretrained(tmp_path) == tmp_path
    model.save_pretrained(tmp_path)  # overwrite in place
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "data").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "data", "model.safetensors", "notes.txt"]  # no temp files left
    loaded = SpadeForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.backbone.embed.weight, model.backbone.embed.weight)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        model.save_pretrained(tmp_path / "notes.txt")


def _die_between_renames(monkeypatch):
    """Make the process 'die' right after the first os.replace of a save (new weights in
    place, config.json still the old one)."""
    import spadeformer.fileio as fileio

    real_replace = fileio.os.replace
    calls = []

    def replace_then_die(src, dst):
        if calls:
            raise KeyboardInterrupt
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace_then_die)


def test_save_interrupted_while_writing_keeps_the_old_model(tmp_path, monkeypatch):
    import safetensors.torch

    old = SpadeForCausalLM(tiny("transformer-window"))
    old.save_pretrained(tmp_path / "m")

    def killed(*args, **kwargs):  # the process dies while writing the new weights
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        SpadeForCausalLM(tiny("transformer-window")).save_pretrained(tmp_path / "m")
    monkeypatch.undo()
    loaded = SpadeForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.backbone.embed.weight, old.backbone.embed.weight)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.safetensors"]


def test_interrupted_save_is_refused_on_load(tmp_path, monkeypatch):
    old = SpadeForCausalLM(tiny("transformer-window"))
    old.save_pretrained(tmp_path / "m")
    new = SpadeForCausalLM(tiny("transformer-window"))
    _die_between_renames(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path / "m")
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "m").iterdir() if ".tmp-" in p.name]
    with pytest.raises(ModelLoadError, match="different saves"):
        SpadeForCausalLM.from_pretrained(tmp_path / "m")
    new.save_pretrained(tmp_path / "m")
    loaded = SpadeForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.backbone.embed.weight, new.backbone.embed.weight)


def test_weights_sharing_one_buffer_save(tmp_path):
    # nn.LSTM on CUDA keeps its weights as views of one cuDNN buffer (flatten_parameters);
    # emulated on CPU: safetensors' save_model refuses such partial overlaps
    model = SpadeForCausalLM(tiny("spade-s4-window", ssm="lstm")).eval()
    lstm = model.backbone.layers[0].ssm.lstm
    flat = torch.cat([w.detach().reshape(-1) for w in lstm._flat_weights])
    offset = 0
    for w in lstm._flat_weights:
        w.data = flat[offset:offset + w.numel()].view_as(w)
        offset += w.numel()
    model.save_pretrained(tmp_path / "m")
    loaded = SpadeForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 37, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_directory_saved_before_the_save_id_loads(tmp_path):
    import json

    from safetensors.torch import save_model

    model = SpadeForCausalLM(tiny("spade-s4-window")).eval()
    d = tmp_path / "old"
    d.mkdir()
    save_model(model, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(
        {"model_class": "SpadeForCausalLM", "config": model.config.to_dict()}))
    loaded = SpadeForCausalLM.from_pretrained(d).eval()
    ids = torch.randint(0, 37, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bad_map_location(tmp_path):
    d = SpadeForCausalLM(tiny("transformer-window")).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="map_location: device must be .*got 'cpux'"):
        SpadeForCausalLM.from_pretrained(d, map_location="cpux")
    assert SpadeForCausalLM.from_pretrained(d, map_location=torch.device("cpu")) is not None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SpadeForCausalLM.from_pretrained(d, map_location="cuda")


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        SpadeForCausalLM.from_pretrained(tmp_path / "nothing")
    model = SpadeForCausalLM(tiny("transformer-window"))
    d = model.save_pretrained(tmp_path / "m")
    weights = d / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        SpadeForCausalLM.from_pretrained(d)
    model.save_pretrained(d)
    with pytest.raises(ModelLoadError, match="holds a SpadeForCausalLM"):
        SpadeForSequenceClassification.from_pretrained(d)
    # a config that no longer matches the weights
    other = SpadeForCausalLM(tiny("transformer-window", d_model=16, n_heads=2, d_ff=32))
    (d / "config.json").write_text(
        '{"model_class": "SpadeForCausalLM", "config": ' + other.config.to_json() + "}"
    )
    with pytest.raises(ModelLoadError):
        SpadeForCausalLM.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="missing config.json"):
        SpadeForCausalLM.from_pretrained(d)


def test_bad_input_ids():
    model = SpadeForCausalLM(tiny("transformer-window"))
    with pytest.raises(ValueError, match=r"ids in \[0, vocab_size=37\)"):
        model(torch.tensor([[1, 2, 40]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2, 3]))


def test_load_pretrained_weights_moves_a_backbone_between_heads(tmp_path):
    from spadeformer.models import load_pretrained_weights

    lm = SpadeForCausalLM(tiny("spade-s4-window"))
    lm.save_pretrained(tmp_path / "lm")
    same = SpadeForCausalLM(tiny("spade-s4-window"))
    report = load_pretrained_weights(same, tmp_path / "lm")
    assert report["fresh"] == [] and report["unused"] == []
    torch.testing.assert_close(same.lm_head.weight, lm.lm_head.weight, rtol=0, atol=0)
    clf = SpadeForSequenceClassification(tiny("spade-s4-window", num_labels=3))
    report = load_pretrained_weights(clf, tmp_path / "lm")
    assert report["fresh"] and all(not n.startswith("backbone.") for n in report["fresh"])
    assert report["unused"] == []  # the LM head is the embedding (tied), which was used
    for name, tensor in clf.backbone.state_dict().items():
        torch.testing.assert_close(tensor, lm.backbone.state_dict()[name], rtol=0, atol=0)
    wider = SpadeForCausalLM(tiny("spade-s4-window", d_model=16, n_heads=2, d_ff=32))
    with pytest.raises(ValueError, match=r"backbone does not fit this model: backbone\.\S+ is"
                       r".*differs in d_model \(32 there, 16 here\), n_heads .*d_ff \(64 there"):
        load_pretrained_weights(wider, tmp_path / "lm")
    # an LM's causal S4 backbone under a bidirectional classifier: the message says so
    bidirectional = SpadeForSequenceClassification(tiny("spade-s4-window", causal=False))
    with pytest.raises(ValueError, match=r"differs in causal \(True there, False here\)\)$"):
        load_pretrained_weights(bidirectional, tmp_path / "lm")


def test_load_pretrained_weights_takes_the_backbone_name_of_tied_tensors(tmp_path):
    from spadeformer.models import load_pretrained_weights

    untied = SpadeForCausalLM(tiny("transformer-window", tie_embeddings=False))
    untied.save_pretrained(tmp_path / "untied")
    tied = SpadeForCausalLM(tiny("transformer-window"))
    report = load_pretrained_weights(tied, tmp_path / "untied")
    torch.testing.assert_close(tied.backbone.embed.weight, untied.backbone.embed.weight,
                               rtol=0, atol=0)  # not the saved output layer
    assert report["unused"] == ["lm_head.weight"]


def test_interrupted_save_over_an_old_directory_is_refused(tmp_path, monkeypatch):
    import json

    from safetensors.torch import save_model

    old = SpadeForCausalLM(tiny("transformer-window"))
    d = tmp_path / "old"
    d.mkdir()
    save_model(old, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(
        {"model_class": "SpadeForCausalLM", "config": old.config.to_dict()}))
    _die_between_renames(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        SpadeForCausalLM(tiny("transformer-window")).save_pretrained(d)
    monkeypatch.undo()
    with pytest.raises(ModelLoadError, match="different saves"):
        SpadeForCausalLM.from_pretrained(d)
