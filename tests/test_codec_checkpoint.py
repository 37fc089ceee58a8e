"""load_codec accepts every real checkpoint form and names missing/unexpected keys."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from fish_speech_core.codec import (
    CodecCheckpointError,
    CodecCheckpointWarning,
    FireflyConfig,
    codec_hash,
    init_codec,
    load_codec,
    save_codec,
)
from fish_speech_core.weights import WeightsError


@pytest.fixture(scope="module")
def small_state(reference: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference / "firefly" / "small-model.pth", weights_only=True)


def _save(tmp_path: Path, obj, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _assert_same_weights(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def test_bare_state_dict_loads_strictly(reference, small_state):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all for a complete checkpoint
        model = load_codec(reference / "firefly" / "small-model.pth", "tiny")
    _assert_same_weights(model, small_state)
    assert not model.training


def test_wrapped_and_prefixed_forms_load(tmp_path, small_state):
    wrapped = _save(tmp_path, {"state_dict": {f"generator.{k}": v for k, v in small_state.items()}})
    _assert_same_weights(load_codec(wrapped, "tiny"), small_state)


def test_old_weight_norm_names_and_removed_parametrizations_load(tmp_path, small_state):
    old, folded = {}, {}
    for key, value in small_state.items():
        if key.endswith(".parametrizations.weight.original0"):
            stem = key[: -len(".parametrizations.weight.original0")]
            v = small_state[stem + ".parametrizations.weight.original1"]
            old[stem + ".weight_g"] = value
            norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
            folded[stem + ".weight"] = value * v / norm  # what remove_parametrizations leaves
        elif key.endswith(".parametrizations.weight.original1"):
            old[key.replace(".parametrizations.weight.original1", ".weight_v")] = value
        else:
            old[key] = folded[key] = value
    _assert_same_weights(load_codec(_save(tmp_path, old, "old.pth"), "tiny"), small_state)
    refolded = load_codec(_save(tmp_path, folded, "folded.pth"), "tiny")
    with torch.inference_mode():
        features = torch.randn(1, 128, 8, generator=torch.Generator().manual_seed(0))
        reference = load_codec(_save(tmp_path, small_state, "bare.pth"), "tiny")
        torch.testing.assert_close(refolded.head(features), reference.head(features), atol=1e-6, rtol=0)


def test_missing_encoder_keys_are_an_error_naming_them(tmp_path, small_state):
    state = dict(small_state)
    del state["backbone.norm.weight"], state["quantizer.residual_fsq.rvqs.3.project_in.bias"]
    with pytest.raises(CodecCheckpointError) as info:
        load_codec(_save(tmp_path, state), "tiny")
    assert "backbone.norm.weight" in str(info.value)
    assert "quantizer.residual_fsq.rvqs.3.project_in.bias" in str(info.value)


def test_unexpected_and_missing_head_keys_warn(tmp_path, small_state):
    state = {k: v for k, v in small_state.items() if not k.startswith("head.conv_post")}
    state["discriminator.conv.weight"] = torch.zeros(3)
    with pytest.warns(CodecCheckpointWarning) as record:
        model = load_codec(_save(tmp_path, state), "tiny")
    messages = " ".join(str(w.message) for w in record)
    assert "discriminator.conv.weight" in messages
    assert "head.conv_post.conv.bias" in messages
    assert torch.equal(model.state_dict()["backbone.norm.bias"], small_state["backbone.norm.bias"])


def test_encoder_only_load_has_the_same_weights_and_hash_and_no_decoder(tmp_path, reference, small_state):
    path = reference / "firefly" / "small-model.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decoder keys it skips are not "unexpected"
        model = load_codec(path, "tiny", decoder=False)
    assert model.head is None
    _assert_same_weights(model, {k: v for k, v in small_state.items() if not k.startswith("head.")})
    assert codec_hash(model) == codec_hash(load_codec(path, "tiny"))
    audio = torch.randn(model.config.samples_per_code * 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.encode([audio])[0], load_codec(path, "tiny").encode([audio])[0])
    with pytest.raises(RuntimeError, match="without its decoder"):
        model.decode(torch.zeros(1, model.config.num_codebooks, 2, dtype=torch.long))
    state = dict(small_state, **{"discriminator.conv.weight": torch.zeros(3)})
    with pytest.warns(CodecCheckpointWarning, match="discriminator.conv.weight"):
        load_codec(_save(tmp_path, state), "tiny", decoder=False)


def test_wrong_preset_is_an_error_naming_shapes(reference):
    with pytest.raises(CodecCheckpointError, match="shape mismatches"):
        load_codec(reference / "firefly" / "small-model.pth", "fish-speech-1.4")


def test_init_save_load_round_trip(tmp_path):
    model = init_codec(FireflyConfig.from_name("tiny"), seed=3)
    path = tmp_path / "codec.pth"
    save_codec(model, path)
    loaded = load_codec(path)  # config taken from the checkpoint
    assert loaded.config == model.config
    assert codec_hash(loaded) == codec_hash(model)
    assert codec_hash(init_codec(FireflyConfig.from_name("tiny"), seed=3)) == codec_hash(model)
    assert codec_hash(init_codec(FireflyConfig.from_name("tiny"), seed=4)) != codec_hash(model)


def test_codec_hash_ignores_the_head():
    model = init_codec(FireflyConfig.from_name("tiny"))
    before = codec_hash(model)
    with torch.no_grad():
        model.head.conv_post.conv.bias.add_(1.0)
    assert codec_hash(model) == before
    with torch.no_grad():
        model.backbone.norm.bias.add_(1e-3)
    assert codec_hash(model) != before


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "not-a-checkpoint.pth"
    path.write_bytes(b"hello")
    with pytest.raises(WeightsError, match="could not read .* as a torch checkpoint"):
        load_codec(path, "tiny")
