"""Firefly codec parity against the Fish Speech 1.4.3 fixtures (README sections 7, 8, decode/)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fish_speech_core.audio import read_audio, resample, to_mono
from fish_speech_core.codec import FireflyCodec, FireflyConfig, load_codec

NAMES = {"a": "a.wav", "b": "b.flac", "c": "c.wav"}


def load_clip(path: Path) -> torch.Tensor:
    """The reference pipeline's steps 1-3: float32, channel mean, resample to 44.1 kHz."""
    audio, rate = read_audio(path)
    return resample(torch.from_numpy(to_mono(audio)), rate, 44100)


@pytest.fixture(scope="module")
def firefly(reference: Path) -> Path:
    return reference / "firefly"


@pytest.fixture(scope="module")
def small_model(firefly: Path) -> FireflyCodec:
    return load_codec(firefly / "small-model.pth", firefly / "small-config.json")


@pytest.fixture(scope="module")
def clips(firefly: Path) -> dict[str, torch.Tensor]:
    return {key: load_clip(firefly / name) for key, name in NAMES.items()}


def test_resampled_lengths_match_readme(clips):
    assert {k: v.shape[-1] for k, v in clips.items()} == {"a": 132300, "b": 88200, "c": 66150}


def test_log_mel_of_a_matches_reference(small_model, clips, firefly):
    expected = torch.load(firefly / "expected-mels.pt", weights_only=True)
    with torch.inference_mode():
        mel = small_model.spec_transform(clips["a"])
    assert mel.shape == expected.shape == (160, 258)
    torch.testing.assert_close(mel, expected, atol=1e-4, rtol=0)


def _assert_codes_equal(codes: np.ndarray, expected_path: Path) -> None:
    expected = np.load(expected_path)
    assert expected.dtype.str == "<i4"
    assert codes.dtype == expected.dtype and codes.shape == expected.shape
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.parametrize("form", ["bare", "generator-prefixed"])
def test_codes_match_reference_alone(form, firefly, clips, tmp_path):
    path = firefly / "small-model.pth"
    if form == "generator-prefixed":  # small-generator.pth: every key prefixed "generator."
        state = torch.load(path, weights_only=True)
        path = tmp_path / "small-generator.pth"
        torch.save({f"generator.{k}": v for k, v in state.items()}, path)
    model = load_codec(path, firefly / "small-config.json")
    with torch.inference_mode():
        for key in NAMES:
            (codes,) = model.encode([clips[key]])
            _assert_codes_equal(codes.numpy(), firefly / "expected-codes-alone" / f"{key}.npy")


def test_codes_are_batch_invariant(small_model, clips, firefly):
    """Alone, together and shuffled give the same codes: the reference's alone codes."""
    keys = list(NAMES)
    with torch.inference_mode():
        alone = {k: small_model.encode([clips[k]])[0] for k in keys}
        together = dict(zip(keys, small_model.encode([clips[k] for k in keys])))
        for seed in range(3):
            shuffled = keys[:]
            random.Random(seed).shuffle(shuffled)
            mixed = dict(zip(shuffled, small_model.encode([clips[k] for k in shuffled])))
            for k in keys:
                assert torch.equal(mixed[k], alone[k]), (seed, k)
    for k in keys:
        assert torch.equal(together[k], alone[k]), k
        _assert_codes_equal(together[k].numpy(), firefly / "expected-codes-alone" / f"{k}.npy")
    # The reference's batched b differs from its alone b in exactly one code (README finding).
    batched_b = np.load(firefly / "expected-codes" / "b.npy")
    assert (batched_b != together["b"].numpy()).sum() == 1


def test_quantizer_decode_and_head_match_reference(small_model, reference, firefly):
    decode = reference / "decode"
    with torch.inference_mode():
        for key in NAMES:
            codes = torch.from_numpy(np.load(firefly / "expected-codes-alone" / f"{key}.npy"))[None]
            features = small_model.quantizer.decode(codes)
            expected = torch.load(decode / f"{key}-quantizer-decoded.pt", weights_only=True)
            torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
            audio = small_model.decode(codes)
            assert audio.shape == (1, 1, codes.shape[-1] * 2048)
            want = torch.from_numpy(np.load(decode / f"{key}-audio.npy"))
            torch.testing.assert_close(audio[0, 0], want, atol=1e-6, rtol=0)


def test_head_with_gain_3_matches_reference(firefly, reference, small_model):
    """The stock head passes little of its input; x3 weight-norm gains make the check sharp."""
    state = torch.load(firefly / "small-model.pth", weights_only=True)
    boosted = {k: v * 3.0 if k.endswith("parametrizations.weight.original0") else v for k, v in state.items()}
    assert sum(k.endswith("parametrizations.weight.original0") for k in state) == 97
    model = FireflyCodec(small_model.config).eval()
    model.load_state_dict(boosted, strict=True)
    with torch.inference_mode():
        for key in NAMES:
            features = torch.load(reference / "decode" / f"{key}-quantizer-decoded.pt", weights_only=True)
            want = torch.from_numpy(np.load(reference / "decode" / "head-gain-3" / f"{key}-audio.npy"))
            torch.testing.assert_close(model.head(features)[0, 0], want, atol=1e-5, rtol=0)


def test_real_size_preset_matches_real_checkpoint_shape(reference):
    real = json.loads((reference / "firefly-real-shape.json").read_text())
    with torch.device("meta"):
        model = FireflyCodec(FireflyConfig.from_name("fish-speech-1.4"))
    state = model.state_dict()
    assert len(state) == real["num_state_dict_keys"] == 547
    assert {k: list(v.shape) for k, v in state.items()} == {
        k: v["shape"] for k, v in real["state_dict"].items()
    }
    assert all(str(v.dtype) == f"torch.{real['state_dict'][k]['dtype']}" for k, v in state.items())
    counts = {
        part: sum(v.numel() for k, v in state.items() if k.startswith(f"{part}."))
        for part in ("backbone", "quantizer", "head", "spec_transform")
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    assert counts == real["parameter_counts"]


def test_small_config_json_equals_tiny_preset(firefly):
    assert FireflyConfig.from_file(firefly / "small-config.json") == FireflyConfig.from_name("tiny")


def test_config_errors_name_every_problem(firefly):
    data = json.loads((firefly / "small-config.json").read_text())
    data["backbone"]["depth"] = [1]
    data["quantizer"]["_target_"] = "something.Else"
    del data["head"]
    with pytest.raises(ValueError) as info:
        FireflyConfig.from_dict(data)
    message = str(info.value)
    assert "backbone: unknown arguments ['depth']" in message
    assert "quantizer._target_" in message
    assert "missing section 'head'" in message
    with pytest.raises(ValueError, match="unknown codec preset"):
        FireflyConfig.from_name("huge")


def test_config_round_trips_through_dict():
    config = FireflyConfig.from_name("fish-speech-1.4")
    assert FireflyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_too_short_clip_is_refused(small_model):
    with pytest.raises(ValueError, match="shorter than one code frame"):
        small_model.encode([torch.zeros(2047)])
    (codes,) = small_model.encode([torch.zeros(2048)])
    assert codes.shape == (8, 1)
