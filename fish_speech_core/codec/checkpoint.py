"""Checkpoint I/O for the Firefly codec: the one place that reads and writes its weights.

Accepted forms of the reference ``firefly-gan-vq-fsq-8x1024-21hz-generator.pth``:
a bare state dict, ``{"state_dict": ...}``, keys prefixed ``generator.`` (the full VQ-GAN
training checkpoint; its discriminator keys are then reported as unexpected), weight-norm
parametrization keys (``...parametrizations.weight.original0/1``), the older
``weight_g``/``weight_v`` names, and plain ``weight`` after ``remove_parametrizations``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from fish_speech_core.codec.config import FireflyConfig, resolve_config
from fish_speech_core.codec.model import FireflyCodec
from fish_speech_core.files import atomic_torch_save
from fish_speech_core.meta import on_meta
from fish_speech_core.weights import WeightsError, read_weights

GENERATOR_PREFIX = "generator."
CONFIG_KEY = "codec_config"  # where save_codec stores the constructor arguments
WN_G = ".parametrizations.weight.original0"  # weight-norm magnitude g, shape (out, 1, 1)
WN_V = ".parametrizations.weight.original1"  # weight-norm direction v, the conv weight shape
ENCODER_PARTS = ("backbone.", "quantizer.")  # everything needed to turn audio into codes


def _listing(keys: list[str], limit: int = 50) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


class CodecCheckpointError(WeightsError):
    """A checkpoint that cannot give a working encoder; the message lists the keys."""


class CodecCheckpointWarning(UserWarning):
    """Keys that were ignored or parts (the decoder head) that were left at init."""


def _unwrap(obj: Mapping) -> tuple[dict[str, Tensor], dict | None]:
    """-> (state dict, embedded config or None)."""
    config = obj.get(CONFIG_KEY) if isinstance(obj.get(CONFIG_KEY), Mapping) else None
    if isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    # Only our embedded config may sit beside the tensors of a bare state dict.
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor) and k != CONFIG_KEY)
    if not_tensors:
        raise CodecCheckpointError(f"state dict entries {_listing(not_tensors)} are not tensors")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise CodecCheckpointError("checkpoint holds no tensors")
    return state, config


def _normalize_keys(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map every accepted key spelling onto our module's names (explicit rules, no guessing)."""
    if any(k.startswith(GENERATOR_PREFIX) for k in state):
        # Full VQ-GAN checkpoints also hold discriminator etc.; those stay as "unexpected".
        state = {
            (k[len(GENERATOR_PREFIX):] if k.startswith(GENERATOR_PREFIX) else k): v
            for k, v in state.items()
        }
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            key = key[: -len(".weight_g")] + WN_G
        elif key.endswith(".weight_v"):
            key = key[: -len(".weight_v")] + WN_V
        elif key.endswith(".weight") and key not in expected and key[: -len(".weight")] + WN_V in expected:
            # remove_parametrizations folded g into the weight: g = ||w||, v = w gives w back.
            stem = key[: -len(".weight")]
            dims = tuple(range(1, value.dim()))
            out[stem + WN_G] = torch.linalg.vector_norm(value, dim=dims, keepdim=True)
            key = stem + WN_V
        out[key] = value
    return out


def load_codec(
    path: str | os.PathLike,
    preset_or_config: str | os.PathLike | FireflyConfig | None = None,
    device: str | torch.device = "cpu",
    decoder: bool = True,
) -> FireflyCodec:
    """Load a Firefly codec checkpoint into an ``eval()`` model.

    Args:
        path: a ``.pth``/``.ckpt`` in any form listed in the module docstring.
        preset_or_config: preset name, JSON config path or config. ``None`` takes the config
            stored by :func:`save_codec`, else the ``fish-speech-1.4`` preset.
        device: where to put the model.
        decoder: False builds and loads the audio -> codes half only (what extraction needs, in
            a fraction of the time); the checkpoint's decoder keys are then ignored silently.

    Raises:
        WeightsError: the file is missing, not a torch file, or holds objects other than tensors.
        CodecCheckpointError (a WeightsError): encoder or quantizer keys missing, or any shape
            mismatch.

    Warns:
        CodecCheckpointWarning: unexpected keys (ignored) and missing head keys (decode unusable).
    """
    state, stored = _unwrap(read_weights(path))
    if preset_or_config is not None:
        config = resolve_config(preset_or_config)
    elif stored is not None:
        config = FireflyConfig.from_dict(stored)
    else:
        config = resolve_config("fish-speech-1.4")
    with on_meta():
        model = FireflyCodec(config, decoder=decoder)
    expected = model.state_dict()
    state = _normalize_keys(state, expected)
    if not decoder:  # not built, so not unexpected; _normalize_keys left their names as they were
        state = {k: v for k, v in state.items() if not k.startswith("head.")}

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    missing_encoder = [k for k in missing if k.startswith(ENCODER_PARTS)]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    wrong_dtype = [
        f"{k}: checkpoint dtype {state[k].dtype} vs model {expected[k].dtype}"
        for k in sorted(set(state) & set(expected))
        if expected[k].is_floating_point() and not state[k].is_floating_point()
    ]
    problems = []
    if missing_encoder:
        problems.append(f"{len(missing_encoder)} encoder/quantizer keys missing: {_listing(missing_encoder)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched, 10)}")
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} dtype mismatches: {_listing(wrong_dtype, 10)}")
    if problems:
        raise CodecCheckpointError(
            f"{path} does not fit this codec config ({'; '.join(problems)}). "
            "Is it a Firefly VQ-GAN generator, and is the preset/--config right?"
        )
    if unexpected:
        warnings.warn(
            f"{path}: ignoring {len(unexpected)} unexpected keys: {_listing(unexpected)}",
            CodecCheckpointWarning,
            stacklevel=2,
        )
    head_missing = [k for k in missing if not k.startswith(ENCODER_PARTS)]
    if head_missing:
        warnings.warn(
            f"{path}: {len(head_missing)} decoder keys missing, decode() will not work: "
            f"{_listing(head_missing)}",
            CodecCheckpointWarning,
            stacklevel=2,
        )

    if missing:  # the missing (decoder) tensors keep torch's default init
        model = FireflyCodec(config, decoder=decoder)
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    else:
        # Every tensor comes from the checkpoint: take them as they are instead of initialising
        # a real model first (~1 s of random init at real size on CPU). The meta model's
        # non-persistent buffers (window, filterbank, FSQ levels) are already real CPU tensors.
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items() if k in expected},
                              strict=True, assign=True)
    return model.to(device).eval()


def init_codec(config: FireflyConfig, seed: int = 0) -> FireflyCodec:
    """A randomly initialised codec, for offline demos, tests and benchmarks.

    PyTorch's default init (under ``seed``), then seeded Gaussian noise x0.05 on every encoder
    and quantizer parameter, as the fixture model was made: with layer scale 1e-6 alone the
    codes would barely depend on the audio.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FireflyCodec(config)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (model.backbone, model.quantizer):
            for param in part.parameters():
                param.add_(torch.randn(param.shape, generator=noise) * 0.05)
    return model.eval()


def save_codec(model: FireflyCodec, path: str | os.PathLike) -> None:
    """Write ``{"state_dict", "codec_config"}`` atomically; :func:`load_codec` reads it back."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, CONFIG_KEY: model.config.to_dict()}, path)


def codec_hash(model: FireflyCodec) -> str:
    """sha256 of everything that decides the codes: front-end/encoder/quantizer config + weights.

    The decoder head is left out: it never changes the codes.
    """
    digest = hashlib.sha256()
    config = model.config.to_dict()
    digest.update(
        json.dumps({k: config[k] for k in ("spec_transform", "backbone", "quantizer")}, sort_keys=True).encode()
    )
    state = model.state_dict()
    for key in sorted(k for k in state if k.startswith(ENCODER_PARTS)):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
