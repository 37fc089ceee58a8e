"""Codes -> waveform with the Firefly codec, batched with lengths (fixtures README ``decode/``).

``FireflyCodec.decode`` decodes one unpadded batch. This adds the reference's masks for a
zero-padded batch: frames past ``4 * length`` are zeroed before the HiFi-GAN head and samples
past ``length * samples_per_code`` after it. The decoder is causal, so padding never reaches
the valid samples of a shorter item.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fish_speech_core.codec.model import FireflyCodec


def decode(
    codec: FireflyCodec, codes: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Decode codes (B, num_codebooks, T) (or one (num_codebooks, T) item) to audio.

    Args:
        codec: an ``eval()`` codec.
        codes: integer codes in [0, codebook_size); int32 and int64 give identical bits.
        lengths: (B,) valid code frames per item; None = all T.

    Returns:
        (audio (B, 1, T * samples_per_code) float, audio_lengths (B,) int64 =
        lengths * samples_per_code).
    """
    if codes.dim() == 2:
        codes = codes[None]
    if codes.dim() != 3 or codes.size(1) != codec.config.num_codebooks:
        raise ValueError(
            f"codes must be (B, {codec.config.num_codebooks}, frames), got {tuple(codes.shape)}"
        )
    b, _, t = codes.shape
    device = next(codec.parameters()).device
    codes = codes.to(device).long()
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long)
    lengths = lengths.to(device).long()
    features = codec.quantizer.decode(codes)  # (B, C, 4T)
    factor = features.size(-1) // t
    frame = torch.arange(features.size(-1), device=device)
    features = features * (frame[None] < factor * lengths[:, None])[:, None].to(features.dtype)
    audio = codec.decoder_head()(features)  # (B, 1, T * samples_per_code)
    audio_lengths = lengths * codec.config.samples_per_code
    sample = torch.arange(audio.size(-1), device=device)
    audio = audio * (sample[None] < audio_lengths[:, None])[:, None].to(audio.dtype)
    return audio, audio_lengths
