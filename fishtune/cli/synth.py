"""Listening commands: ``synthesize`` (text -> wav with a base or finetuned model) and
``decode`` (a codes ``.npy`` -> wav)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from fish_speech_core.choices import CodecPreset, Device


def _codec_choice(preset: CodecPreset | None, config: Path | None, flag: str) -> str | Path | None:
    if preset is not None and config is not None:
        raise typer.BadParameter(f"give {flag} or --codec-config/--config, not both", param_hint=flag)
    return preset.value if preset is not None else config


def synthesize_command(
    model: Path = typer.Option(
        ..., "--model", help="LM checkpoint folder (config.json, model.pth, tokenizer): a base "
        "model, a merged finetune, or one from `fishtune init-base`.",
        exists=True, file_okay=False,
    ),
    codec: Path = typer.Option(
        ..., "--codec", help="Firefly codec checkpoint "
        "(firefly-gan-vq-fsq-8x1024-21hz-generator.pth, or one from `fishtune init-codec`).",
        exists=True, dir_okay=False,
    ),
    text: str = typer.Option(..., "--text", help="What to say. Long texts are split into "
                             "sentences and generated chunk by chunk."),
    output: Path = typer.Option(..., "--output", "-o", help="WAV file to write (44.1 kHz, 16-bit).",
                                dir_okay=False),
    codec_preset: CodecPreset | None = typer.Option(
        None, "--codec-preset", help="Codec shape. Default: the config stored in the checkpoint, else fish-speech-1.4.",
    ),
    codec_config: Path | None = typer.Option(
        None, "--codec-config", help="JSON of codec constructor arguments, for other shapes.",
        exists=True, dir_okay=False,
    ),
    prompt_audio: Path | None = typer.Option(
        None, "--prompt-audio", help="A clip of the voice to clone (needs --prompt-text).",
        exists=True, dir_okay=False,
    ),
    prompt_text: str | None = typer.Option(
        None, "--prompt-text", help="The exact transcript of --prompt-audio."
    ),
    lora: Path | None = typer.Option(
        None, "--lora", help="LoRA adapter checkpoint applied to --model on the fly (no merge).",
        exists=True,
    ),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="Sampling temperature."),
    top_p: float = typer.Option(0.7, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    repetition_penalty: float = typer.Option(
        1.2, "--repetition-penalty", min=0.01, help="Penalty on codes used in the last 16 steps."
    ),
    max_new_tokens: int = typer.Option(
        1024, "--max-new-tokens", min=1, help="Most code frames per chunk (~21.5 per second)."
    ),
    chunk_chars: int = typer.Option(
        150, "--chunk-chars", min=10, help="Longest chunk of text generated at once."
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: same seed, same audio."),
    device: Device = typer.Option(Device.auto, "--device", help="Where the model runs (auto: cuda if available; bf16 on CUDA)."),
) -> None:
    """Speak TEXT with a base or finetuned model, optionally in the voice of a reference clip."""
    from fish_speech_core.lm.generate import SamplingSettings

    problems = []
    if (prompt_audio is None) != (prompt_text is None):
        problems.append("--prompt-audio and --prompt-text go together (give both or neither)")
    if not text.strip():
        problems.append("--text is empty")
    from fish_speech_core.files import OverlapError, refuse_overlap

    try:  # the WAV is written: never over (or around) an input such as the prompt clip
        refuse_overlap([("--prompt-audio", prompt_audio), ("--model", model), ("--codec", codec),
                        ("--lora", lora)], output, "--output")
    except OverlapError as err:
        problems.append(str(err))
    if problems:
        raise typer.BadParameter("; ".join(problems))
    codec_choice = _codec_choice(codec_preset, codec_config, "--codec-preset")

    import torch

    from fish_speech_core.progress import progress_bar
    from fish_speech_core.synthesis import (
        check_finite_audio,
        encode_reference,
        load_synthesizer,
        split_text,
        synthesize,
        write_wav,
    )

    # Inference only, restored at the end: the command also runs in-process (CliRunner, callers).
    grad_was_enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        started = time.perf_counter()
        try:
            synth = load_synthesizer(model, codec, codec_choice, lora, device.value)
        except (ValueError, NotImplementedError, OSError) as error:
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(2) from None
        loaded = time.perf_counter() - started
        try:
            prompt_codes = encode_reference(synth, prompt_audio) if prompt_audio is not None else None
        except ValueError as error:  # not audio, empty, NaN, shorter than one code frame
            typer.echo(f"Error: --prompt-audio: {error}", err=True)
            raise typer.Exit(2) from None
        chunks = split_text(text, chunk_chars)
        settings = SamplingSettings(temperature, top_p, repetition_penalty)
        # Over --max-new-tokens per chunk: a chunk usually ends (end of speech) before its total.
        with progress_bar() as progress:
            task = progress.add_task(f"chunk 1/{len(chunks)}", total=max_new_tokens, unit="tokens")

            def on_step(n: int) -> None:
                progress.update(task, completed=n)

            def on_chunk(i: int, total: int, result) -> None:
                progress.reset(task, total=max_new_tokens, description=f"chunk {min(i + 2, total)}/{total}",
                               note=f"last: {result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s")

            try:
                result = synthesize(
                    synth, text, prompt_codes, prompt_text, settings, max_new_tokens, seed,
                    chunk_chars, on_chunk=on_chunk, on_step=on_step,
                )
            except ValueError as error:  # e.g. the prompt leaves no room within max_seq_len
                typer.echo(f"Error: {error}", err=True)
                raise typer.Exit(2) from None
        try:
            check_finite_audio(result.audio, output)
            write_wav(output, result.audio, result.sample_rate)
        except ValueError as error:  # NaN audio from damaged weights
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(2) from None
        seconds = result.audio.numel() / result.sample_rate
        typer.echo(
            f"Wrote {output}: {seconds:.2f} s of audio at {result.sample_rate} Hz from "
            f"{len(result.chunks)} chunk(s), {result.new_tokens} tokens "
            f"({result.codes.size(1)} code frames) at {result.tokens_per_second:.1f} tokens/s on "
            f"{synth.device.type}; load {loaded:.1f} s, total {time.perf_counter() - started:.1f} s."
        )
        if result.codes.size(1) == 0:
            typer.echo("Warning: the model produced no speech codes (an untrained model?); the "
                       "file is empty.", err=True)
    finally:
        torch.set_grad_enabled(grad_was_enabled)


def decode_command(
    codes_file: Path = typer.Argument(..., help="Codes .npy, int (8, frames), as `fishtune "
                                      "extract` writes.", exists=True, dir_okay=False),
    checkpoint_path: Path = typer.Option(
        ..., "--checkpoint-path", help="Firefly codec checkpoint.", exists=True, dir_okay=False
    ),
    output: Path = typer.Option(..., "--output", "-o", help="WAV file to write (16-bit).",
                                dir_okay=False),
    preset: CodecPreset | None = typer.Option(
        None, "--preset", help="Codec shape. Default: the config stored in the checkpoint, else fish-speech-1.4.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="JSON of codec constructor arguments. Excludes --preset.",
        exists=True, dir_okay=False,
    ),
    device: Device = typer.Option(Device.auto, "--device", help="Where the decoder runs (auto: cuda if available)."),
) -> None:
    """Turn semantic codes back into audio with the codec's decoder (44.1 kHz for Firefly 1.4)."""
    import numpy as np
    import torch

    from fish_speech_core.codec import load_codec
    from fish_speech_core.codec.decode import decode
    from fish_speech_core.codec.extract import code_spec
    from fish_speech_core.codes import array_problem, read_npy
    from fish_speech_core.synthesis import check_finite_audio, pick_device, write_wav

    from fish_speech_core.files import OverlapError, refuse_overlap

    try:  # the WAV is written: never over an input
        refuse_overlap([("CODES_FILE", codes_file), ("--checkpoint-path", checkpoint_path)], output, "--output")
    except OverlapError as err:
        raise typer.BadParameter(str(err)) from None
    choice = _codec_choice(preset, config, "--preset")
    try:
        codes = read_npy(codes_file)
    except ValueError as error:
        _fail_decode(f"{codes_file}: {error}")
    started = time.perf_counter()
    try:
        codec = load_codec(checkpoint_path, choice, device=pick_device(device.value))
    except ValueError as error:
        _fail_decode(str(error))
    spec = code_spec(codec)
    problem = array_problem(codes, spec)
    if problem:
        _fail_decode(f"{codes_file}: {problem}; this codec decodes ({spec.num_codebooks}, frames) "
                     f"with values in [0, {spec.codebook_size})")
    codes = np.array(codes)  # out of the memory map, now that the shape is known to be sane
    with torch.inference_mode():
        audio, _ = decode(codec, torch.from_numpy(codes.astype(np.int64))[None])
    try:
        check_finite_audio(audio, output)
        write_wav(output, audio[0, 0], codec.sample_rate)
    except ValueError as error:  # NaN audio from a damaged decoder
        _fail_decode(f"{checkpoint_path}: {error}")
    seconds = audio.size(-1) / codec.sample_rate
    elapsed = time.perf_counter() - started
    typer.echo(
        f"Wrote {output}: {codes.shape[1]} frames -> {seconds:.2f} s at {codec.sample_rate} Hz "
        f"in {elapsed:.1f} s (RTF {elapsed / max(seconds, 1e-9):.3f})."
    )


def _fail_decode(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("synthesize")(synthesize_command)
    app.command("decode")(decode_command)
