"""Text -> speech: the dual-AR model writes codes, the Firefly codec turns them into audio.

Long texts are split into sentences and packed into chunks of at most ``chunk_chars``
characters. Each chunk is generated with the reference voice (prompt text + its codes) and the
previous chunk (its text + generated codes) as context, so the voice carries over; the codes
of all chunks are decoded in one pass (the codec is causal, so there are no seams).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fish_speech_core.lm.generate import (
    GenerationResult,
    SamplingSettings,
    build_prompt,
    generate,
    semantic_codes,
)
from fish_speech_core.threads import one_thread, small_on_cpu

if TYPE_CHECKING:
    from fish_speech_core.lm.checkpoint import Pretrained

DEFAULT_CHUNK_CHARS = 150
_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？；…])\s+|(?<=[。！？；])")
_CLAUSE_END = re.compile(r"(?<=[,，、])\s*")


def split_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Split into sentences and pack them into chunks of at most ``chunk_chars`` characters.

    A sentence longer than a chunk is split at commas, then at spaces, then hard. Empty input
    gives an empty list.
    """
    if chunk_chars < 1:
        raise ValueError("chunk_chars must be >= 1")
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= chunk_chars:
            pieces.append(sentence)
            continue
        for clause in _CLAUSE_END.split(sentence):
            pieces.extend(_split_long(clause.strip(), chunk_chars))
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= chunk_chars:
            chunks[-1] = f"{chunks[-1]} {piece}"
        elif piece:
            chunks.append(piece)
    return chunks


def _split_long(text: str, limit: int) -> list[str]:
    out: list[str] = []
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit + 1)
        cut = cut if cut > 0 else limit
        out.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        out.append(text)
    return out


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available; use cpu or auto")
    return torch.device(device)


@dataclass
class Synthesizer:
    """A loaded LM + tokenizer + codec on one device (bf16 LM on CUDA, fp32 on CPU)."""

    model: torch.nn.Module
    tokenizer: object
    codec: torch.nn.Module
    device: torch.device

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate


def load_synthesizer(
    model_dir: str | os.PathLike,
    codec_path: str | os.PathLike,
    codec_preset_or_config: str | os.PathLike | None = None,
    lora: str | os.PathLike | None = None,
    device: str = "auto",
    codec: torch.nn.Module | None = None,
) -> Synthesizer:
    """Load the LM folder (optionally with a LoRA adapter applied on the fly) and the codec.

    ``codec``: one already loaded from ``codec_path`` on this device, reused as is (an
    evaluation of several checkpoints loads it once).
    """
    from fish_speech_core.codec import load_codec
    from fish_speech_core.lm import load_pretrained

    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if lora is not None:
        loaded = load_lora_model(model_dir, lora, dtype)
    else:
        loaded = load_pretrained(model_dir, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    model = model.to(dev).eval()
    model.reset_buffers(dev)
    if codec is None:
        codec = load_codec(codec_path, codec_preset_or_config, device=dev)
    return Synthesizer(model=model, tokenizer=tokenizer, codec=codec, device=dev)


def load_lora_model(model_dir: str | os.PathLike, lora: str | os.PathLike, dtype: torch.dtype) -> Pretrained:
    """Base model + LoRA adapter checkpoint (a training checkpoint or a reference LoRA ckpt).

    The adapter is folded into the weights in memory (fp32, then cast to ``dtype``); nothing is
    written. Its metadata (ours carry it) must match the base ``model.pth``; an adapter without
    metadata is read as the recipe's ``r_8_alpha_16``. Returns the merged model with the base
    folder's tokenizer.
    """
    from pathlib import Path

    from fish_speech_core.files import sha256_file
    from fish_speech_core.finetune.lora import (
        DEFAULT_PRESET, LoraSettings, add_lora, load_lora_state_dict, merge_lora, read_adapter,
    )
    from fish_speech_core.lm import load_pretrained

    adapter = read_adapter(lora)  # WeightsError / LoraError (ValueErrors) name the file
    settings = adapter.metadata.settings if adapter.metadata is not None else LoraSettings.from_name(DEFAULT_PRESET)
    base_file = Path(model_dir) / "model.pth"
    if adapter.metadata is not None:
        adapter.metadata.check(settings, sha256_file(base_file) if base_file.is_file() else None)
    loaded = load_pretrained(model_dir, dtype=torch.float32)
    model = add_lora(loaded.model, settings)
    load_lora_state_dict(model, adapter.tensors)
    return replace(loaded, model=merge_lora(model).to(dtype))


def encode_reference(synth: Synthesizer, audio_path: str | os.PathLike) -> Tensor:
    """A reference clip -> codec codes (num_codebooks, frames) int32 on CPU.

    Raises:
        ValueError: naming the file: not readable audio, NaN/Inf samples, or too short.
    """
    import numpy as np

    from fish_speech_core.audio import read_audio, resample, to_mono

    try:
        audio, rate = read_audio(audio_path)
    except Exception as err:  # noqa: BLE001 - libsndfile raises its own types for non-audio
        size = os.path.getsize(audio_path) if os.path.isfile(audio_path) else None
        why = "an empty file (0 bytes)" if size == 0 else f"not readable audio ({type(err).__name__}: {err})"
        raise ValueError(f"{audio_path} is {why}") from None
    if audio.size == 0:
        raise ValueError(f"{audio_path} holds no samples")
    if not np.isfinite(audio).all():
        raise ValueError(f"{audio_path} holds NaN or infinite samples; use a clean recording")
    mono = torch.from_numpy(to_mono(audio))
    mono = resample(mono, rate, synth.sample_rate).to(synth.device)
    try:
        with torch.inference_mode(), one_thread(small_on_cpu(synth.codec, synth.device)):
            return synth.codec.encode([mono])[0].cpu()
    except ValueError as err:  # shorter than one code frame; NaN features (a damaged codec)
        raise ValueError(f"{audio_path}: {err}") from None


@dataclass
class SynthesisResult:
    """audio: (samples,) float32 CPU at ``sample_rate``; per-chunk generation stats."""

    audio: Tensor
    sample_rate: int
    codes: Tensor
    chunks: list[str]
    generations: list[GenerationResult] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(g.new_tokens for g in self.generations)

    @property
    def generation_seconds(self) -> float:
        return sum(g.seconds for g in self.generations)

    @property
    def tokens_per_second(self) -> float:
        s = self.generation_seconds
        return self.new_tokens / s if s > 0 else float("inf")


def synthesize(
    synth: Synthesizer,
    text: str,
    prompt_codes: Tensor | None = None,
    prompt_text: str | None = None,
    settings: SamplingSettings = SamplingSettings(),
    max_new_tokens: int = 1024,
    seed: int = 0,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    on_chunk: Callable[[int, int, GenerationResult], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> SynthesisResult:
    """Speak ``text``; ``prompt_codes`` (K, n) + ``prompt_text`` clone a reference voice.

    One ``torch.Generator`` seeded with ``seed`` drives all sampling, so the same inputs,
    seed and device give the same audio.
    """
    from fish_speech_core.codec.decode import decode

    if (prompt_codes is None) != (prompt_text is None):
        raise ValueError("pass both the prompt audio codes and the prompt text, or neither")
    chunks = split_text(text, chunk_chars)
    if not chunks:
        raise ValueError("the text is empty")
    model, tokenizer = synth.model, synth.tokenizer
    k = model.config.num_codebooks
    generator = torch.Generator(device=synth.device).manual_seed(seed)
    reference = [] if prompt_codes is None else [(prompt_text, prompt_codes.to(torch.int32))]
    previous: list[tuple[str, Tensor]] = []
    all_codes: list[Tensor] = []
    generations: list[GenerationResult] = []
    codebook_size = _codec_codebook_size(synth.codec)
    for index, chunk in enumerate(chunks):
        prompt = build_prompt(tokenizer, chunk, reference + previous, k)
        if prompt.size(1) + max_new_tokens > model.config.max_seq_len and previous:
            previous = []  # keep room to generate: drop the carried-over chunk first
            prompt = build_prompt(tokenizer, chunk, reference, k)
        result = generate(
            model, prompt, tokenizer.im_end_id, max_new_tokens, settings, generator,
            on_step=on_step,
        )
        codes = semantic_codes(result, tokenizer.semantic_id, codebook_size)
        generations.append(result)
        all_codes.append(codes)
        previous = [(chunk, codes.to(torch.int32))] if codes.size(1) > 0 else []
        if on_chunk is not None:
            on_chunk(index, len(chunks), result)
    codes = torch.cat(all_codes, dim=1)
    if codes.size(1) == 0:
        audio = torch.zeros(0)
    else:
        with torch.inference_mode(), one_thread(small_on_cpu(synth.codec, synth.device)):
            wave, _ = decode(synth.codec, codes[None])
        audio = wave[0, 0].float().cpu()
    return SynthesisResult(audio, synth.sample_rate, codes, chunks, generations)


def _codec_codebook_size(codec: torch.nn.Module) -> int:
    """Codes per group of the codec's FSQ: the product of its levels (1000 for Firefly 1.4)."""
    levels = codec.config.quantizer.levels
    size = 1
    for level in levels:
        size *= int(level)
    return size


def check_finite_audio(audio: Tensor, path: str | os.PathLike) -> None:
    """Raise ValueError when generated audio holds NaN/Inf (damaged codec or model weights):
    clipped to PCM it would look like a valid file."""
    if not bool(torch.isfinite(audio).all()):
        raise ValueError(f"the generated audio holds NaN or infinite samples, so {path} was not "
                         "written: the codec or model weights are damaged")


def write_wav(path: str | os.PathLike, audio: Tensor, sample_rate: int) -> Path:
    """Write 16-bit PCM mono atomically (clipped to [-1, 1])."""
    import numpy as np
    import soundfile as sf

    from fish_speech_core.files import atomic_path

    path = Path(path)
    pcm = np.clip(audio.detach().cpu().float().numpy(), -1.0, 1.0)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), pcm, sample_rate, subtype="PCM_16", format="WAV")
    return path
