import pytest

from spadeformer.config import SIZES, SYSTEMS, SpadeConfig
from spadeformer.models import SpadeModel


def test_json_round_trip(tmp_path):
    cfg = SpadeConfig.from_preset("spade-s4-chunk", size="lra", vocab_size=20, num_labels=10)
    path = tmp_path / "c.json"
    cfg.save(path)
    assert SpadeConfig.load(path) == cfg
    assert SpadeConfig.from_json(cfg.to_json()) == cfg


def test_unknown_key_names_closest():
    with pytest.raises(ValueError, match="did you mean 'window_size'"):
        SpadeConfig.from_dict({"windw_size": 3})


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("d_model", 0, "d_model must be a positive integer"),
        ("n_heads", 3, "divisible by n_heads"),
        ("dropout", 1.5, "dropout must be a number in"),
        ("ssm", "mamba", "ssm must be one of"),
        ("attention", "sparse", "attention must be one of"),
        ("position", "rope", "position must be one of"),
        ("norm", "sandwich", "norm must be one of"),
        ("combine", "mul", "combine must be one of"),
        ("global_layers", [7], "global_layers must hold indices"),
        ("window_size", 0, "window_size must be a positive integer"),
        ("chunk_size", -3, "chunk_size must be a positive integer"),  # unused by window: still
        ("n_decoder_layers", 0, "n_decoder_layers must be a positive integer"),
        ("decoder_start_token_id", 256, "decoder_start_token_id must be an integer in"),
        ("pad_token_id", 999, "pad_token_id must be None or an integer in"),
        ("pad_token_id", "3", "pad_token_id must be None or an integer in"),
        ("pad_token_id", 1.5, "pad_token_id must be None or an integer in"),
        ("causal", 1, "causal must be true or false, got 1"),
        ("tie_embeddings", "false", "tie_embeddings must be true or false, got 'false'"),
        ("global_layers", [0.9, True], "global_layers must be a list of integer layer indices"),
        ("global_layers", ["a"], "global_layers must be a list of integer layer indices"),
        ("add_weight", "x", "add_weight must be a number in"),
        ("num_labels", 1, "num_labels must be >= 2"),
        ("ssm_options", {"d_sate": 8}, "unknown ssm_options key 'd_sate' for ssm='s4'; did you "
                                       "mean 'd_state'"),
    ],
)
def test_bad_fields_raise_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SpadeConfig(**{field: value})


def test_pattern_needs_its_size():
    with pytest.raises(ValueError, match="needs chunk_size"):
        SpadeConfig(attention="chunk", chunk_size=None)
    with pytest.raises(ValueError, match="needs every layer global"):
        SpadeConfig(attention="none", n_layers=3, global_layers=[0])
    with pytest.raises(ValueError, match="shaw"):
        SpadeConfig(attention="window", position="shaw")


def test_preset_unknown_names():
    with pytest.raises(ValueError, match="unknown system"):
        SpadeConfig.from_preset("spade-mega")
    with pytest.raises(ValueError, match="unknown size"):
        SpadeConfig.from_preset("s4", size="huge")


def test_presets_cover_the_paper_systems():
    expected = {
        "transformer-full", "transformer-relative", "transformer-window", "transformer-chunk",
        "s4", "s5", "hyena", "spade-s4-window", "spade-s4-chunk", "spade-s5-window",
        "spade-hyena-window", "spade-lstm-window",
    }
    assert expected <= set(SYSTEMS)
    assert {"tiny", "lra", "wikitext103", "t5-base"} <= set(SIZES)


def test_ssm_size_defaults_apply_only_where_understood():
    # the paper freezes S4; the official SPADE code's S4 has no pointwise block
    s4 = SpadeConfig.from_preset("spade-s4-window", size="wikitext103")
    assert s4.ssm_options == {"d_state": 64, "trainable": False, "pointwise": False}
    # the S4 baseline keeps the S4 paper's block (GELU + output linear)
    assert SpadeConfig.from_preset("s4", size="wikitext103").ssm_options == {
        "d_state": 64, "trainable": False}
    hyena = SpadeConfig.from_preset("spade-hyena-window", size="wikitext103")
    assert hyena.ssm_options == {}
    # an `ssm` override is filtered by what *that* SSM takes
    s5 = SpadeConfig.from_preset("spade-s4-window", ssm="s5")
    assert s5.ssm_options == {"d_state": 16}
    SpadeModel(s5)  # builds: no S4-only option reached S5
    custom = SpadeConfig.from_preset("spade-s4-window", ssm_options={"channels": 2,
                                                                      "pointwise": True})
    assert custom.ssm_options == {"d_state": 16, "pointwise": True, "channels": 2}
    with pytest.raises(ValueError, match="pointwise=False needs channels=1"):
        SpadeModel(SpadeConfig.from_preset("spade-s4-window", ssm_options={"channels": 2}))


@pytest.mark.parametrize("system", ["s4", "s5", "hyena"])
def test_ssm_stacks_follow_an_n_layers_override(system):
    cfg = SpadeConfig.from_preset(system, size="lra", n_layers=2)
    assert cfg.n_layers == 2 and cfg.global_layers == [0, 1]
    assert SpadeConfig.from_preset(system, size="tiny", n_layers=5).global_layers == [0, 1, 2, 3, 4]
    assert SpadeConfig.from_preset("spade-s4-window", size="lra", n_layers=3).global_layers == [0]


def test_an_unquoted_none_override_means_the_none_choice():
    from spadeformer.runconfig import build_model_config, load_run_config

    # `model.position=none` reads as YAML null; for these fields it means the "none" choice
    cfg = load_run_config(None, ["model.preset=mega-chunk", "model.position=none"])
    assert cfg["model"]["position"] is None
    assert build_model_config(cfg["model"]).position == "none"
    assert SpadeConfig.from_preset("s4", "tiny", attention=None).attention == "none"
    with pytest.raises(ValueError, match="norm must be one of"):
        SpadeConfig(norm=None)  # no "none" choice: still an error
