"""Codec decode with lengths: parity with the fixtures README ``decode/`` (Addendum 2)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fish_speech_core.codec import load_codec
from fish_speech_core.codec.decode import decode

FRAMES = {"a": 64, "b": 43, "c": 32}


@pytest.fixture(scope="module")
def small_codec(reference: Path):
    firefly = reference / "firefly"
    return load_codec(firefly / "small-model.pth", firefly / "small-config.json")


def _codes(reference: Path, key: str) -> torch.Tensor:
    return torch.from_numpy(np.load(reference / "firefly" / "expected-codes-alone" / f"{key}.npy"))


def test_decode_matches_reference_audio_and_lengths(reference, small_codec):
    for key, n in FRAMES.items():
        codes = _codes(reference, key)
        assert codes.shape == (8, n)
        with torch.no_grad():
            audio, lengths = decode(small_codec, codes[None], torch.tensor([n]))
        want = torch.from_numpy(np.load(reference / "decode" / f"{key}-audio.npy"))
        assert audio.shape == (1, 1, n * 2048)
        assert lengths.tolist() == [n * 2048]
        torch.testing.assert_close(audio[0, 0], want, atol=1e-6, rtol=0)


def test_decode_gain_3_head_and_quantizer_features(reference, small_codec):
    # README: the stock head barely depends on its input; the x3 weight-norm gain proves it does.
    codec = load_codec(reference / "firefly" / "small-model.pth", reference / "firefly" / "small-config.json")
    with torch.no_grad():
        for name, param in codec.head.named_parameters():
            if name.endswith("parametrizations.weight.original0"):
                param.mul_(3.0)
        for key in FRAMES:
            codes = _codes(reference, key)
            features = codec.quantizer.decode(codes[None].long())
            expected = torch.load(reference / "decode" / f"{key}-quantizer-decoded.pt", weights_only=True)
            torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
            audio, _ = decode(codec, codes)
            want = torch.from_numpy(np.load(reference / "decode" / "head-gain-3" / f"{key}-audio.npy"))
            torch.testing.assert_close(audio[0, 0], want, atol=1e-5, rtol=0)


def test_padded_batch_matches_single_items_and_zeroes_the_tail(reference, small_codec):
    items = [_codes(reference, key) for key in FRAMES]
    longest = max(c.size(1) for c in items)
    batch = torch.stack([torch.nn.functional.pad(c, (0, longest - c.size(1))) for c in items])
    lengths = torch.tensor([c.size(1) for c in items])
    with torch.no_grad():
        audio, audio_lengths = decode(small_codec, batch, lengths)
        assert audio_lengths.tolist() == [n * 2048 for n in FRAMES.values()]
        for i, codes in enumerate(items):
            alone, _ = decode(small_codec, codes)
            n = audio_lengths[i]
            torch.testing.assert_close(audio[i, 0, :n], alone[0, 0], atol=1e-6, rtol=0)
            assert torch.all(audio[i, 0, n:] == 0)
