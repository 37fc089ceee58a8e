import json

import pytest

from fish_speech_core.lm import PRESETS, ConfigError, DualARConfig


def test_tiny_config_json_round_trips_byte_for_byte(reference):
    text = (reference / "tiny-llama" / "config.json").read_text()
    config = DualARConfig.from_file(reference / "tiny-llama" / "config.json")
    assert config.to_json() == text
    assert config == PRESETS["tiny"]


def test_real_shape_config_resolves_derived_fields(reference):
    shape = json.loads((reference / "llama-real-shape.json").read_text())
    assert DualARConfig(**shape["config_args"]).to_dict() == shape["resolved_config"]
    assert PRESETS["fish-speech-1.4"].to_dict() == shape["resolved_config"]


def test_derived_fields_follow_the_slow_transformer():
    config = DualARConfig(dim=64, n_head=4, n_layer=1, tie_word_embeddings=False)
    assert (config.head_dim, config.intermediate_size, config.n_local_heads) == (16, 256, 4)
    assert (config.fast_dim, config.fast_n_head, config.fast_n_local_heads) == (64, 4, 4)
    assert (config.fast_head_dim, config.fast_intermediate_size) == (16, 256)
    assert config.fast_attention_qkv_bias is False


def test_mid_preset_is_the_benchmark_size():
    mid = PRESETS["mid"]
    assert (mid.dim, mid.n_layer, mid.n_fast_layer, mid.vocab_size) == (512, 8, 4, 32000)


def test_unknown_config_fields_warn_by_name(tmp_path, reference):
    data = json.loads((reference / "tiny-llama" / "config.json").read_text())
    data.update(flash_attention=True, zzz_extra=1)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"\['flash_attention', 'zzz_extra'\]"):
        config = DualARConfig.from_file(tmp_path / "config.json")
    assert config == PRESETS["tiny"]


def test_wrong_model_type_is_a_clear_error(tmp_path, reference):
    data = json.loads((reference / "tiny-llama" / "config.json").read_text())
    data["model_type"] = "naive"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="model_type is 'naive'.*'dual_ar'"):
        DualARConfig.from_file(tmp_path / "config.json")


def test_inconsistent_heads_are_reported_together():
    with pytest.raises(ConfigError, match="dim 65 is not divisible.*n_head 4 is not a multiple"):
        DualARConfig(dim=65, n_head=4, n_local_heads=3)
