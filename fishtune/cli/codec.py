"""Codec commands: ``init-codec`` (random checkpoint) and ``extract`` (audio -> .npy codes)."""

from __future__ import annotations

from pathlib import Path

import typer

from fish_speech_core.choices import CodecDtype, CodecPreset, Device
from fish_speech_core.defaults import CPU_BATCH_SECONDS, EXTRACT_DECODE_WORKERS


def find_audio_files(data: Path, filelist: Path | None = None, text_extension: str = ".lab") -> list[Path]:
    """The audio files of the dataset's items, sorted, found as ``fishtune validate`` finds them.

    Files discovery refuses (no transcript, a path leaving DATA, ...) are printed with their
    reason and left out; audio-level problems are the extractor's to report.
    """
    from fish_speech_core.validate import collect_items

    items, rejections = collect_items(data, filelist, text_extension)
    for rejection in rejections:
        typer.echo(f"rejected {rejection.describe()}", err=True)
    return sorted({item.audio_path for item in items})


def init_codec_command(
    out: Path = typer.Argument(..., help="Checkpoint file to write (e.g. codec.pth).", dir_okay=False),
    preset: CodecPreset = typer.Option(CodecPreset.tiny, "--preset", help="Codec shape."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights (same seed, same file)."),
) -> None:
    """Write a randomly initialised Firefly codec checkpoint, for offline demos, tests and benchmarks.

    Its codes mean nothing; use the real firefly-gan-vq-fsq-8x1024-21hz-generator.pth for training.
    """  # noqa: E501
    from fish_speech_core.codec import FireflyConfig, init_codec, save_codec

    model = init_codec(FireflyConfig.from_name(preset.value), seed=seed)
    save_codec(model, out)
    count = sum(p.numel() for p in model.parameters())
    typer.echo(f"Wrote {out} ({preset.value}, seed {seed}, {count:,} parameters)")


def extract_command(
    data: Path = typer.Argument(
        ..., help="Dataset folder; each audio file gets <stem>.npy beside it.",
        exists=True, file_okay=False, dir_okay=True,
    ),
    checkpoint_path: Path = typer.Option(
        ..., "--checkpoint-path", help="Firefly generator checkpoint "
        "(firefly-gan-vq-fsq-8x1024-21hz-generator.pth, or one from init-codec).",
        exists=True, dir_okay=False,
    ),
    preset: CodecPreset | None = typer.Option(
        None, "--preset", help="Codec shape. Default: the config stored in the checkpoint, else fish-speech-1.4.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="JSON of codec constructor arguments (like small-config.json), "
        "for codecs of other shapes. Excludes --preset.", exists=True, dir_okay=False,
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1,
        help="Files per encoder batch. Default: 1 on CPU (batching only adds padding work there), 16 on CUDA.",
    ),
    num_workers: int = typer.Option(
        EXTRACT_DECODE_WORKERS, "--num-workers", min=0, help="Data-loader worker processes that read, decode "
        "and resample audio while the codec encodes (0: this process does it: before each batch on CPU, in a thread "
        "ahead of the GPU on CUDA).",
    ),
    device: Device = typer.Option(Device.auto, "--device", help="Where the codec runs (auto: cuda if available)."),
    filelist: Path | None = typer.Option(
        None, "--filelist", help="Only the files named in this path|speaker|language|text list "
        "(paths relative to DATA).", exists=True, dir_okay=False,
    ),
    text_extension: str = typer.Option(".lab", "--text-extension", help="Transcript extension: only audio with a transcript is extracted."),
    max_batch_seconds: float = typer.Option(
        0.0, "--max-batch-seconds", min=0.0, help="Cap on padded audio seconds per batch "
        f"(0: auto, {CPU_BATCH_SECONDS:g} on CPU where big batches are slower, none on CUDA).",
    ),
    max_seconds: float = typer.Option(
        30.0, "--max-seconds", min=0.001, help="Reject longer files (reported, not loaded)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Re-extract every file, even those whose codes are up to date."
    ),
    dtype: CodecDtype = typer.Option(
        CodecDtype.fp32, "--dtype", help="fp32 (matches the reference) or bf16 (encoder under autocast; "
        "faster on recent GPUs, a few codes may differ).",
    ),
) -> None:
    """Extract Fish Speech semantic tokens: every audio file under DATA -> <stem>.npy (int32, 8 x frames).

    Incremental: a file is skipped only if its .npy was made from the same audio bytes with the same codec weights and dtype (recorded in <stem>.npy.json); anything else is redone.
    """  # noqa: E501  (typer keeps line breaks in help text)
    if preset is not None and config is not None:
        raise typer.BadParameter("give --preset or --config, not both")

    import torch

    from fish_speech_core.codec import CodecCheckpointError, load_codec
    from fish_speech_core.codec.extract import (
        ExtractSettings, batching_for, check_finite_weights, plan_extraction, run_extraction,
    )
    from fish_speech_core.codec.checkpoint import codec_hash
    from fish_speech_core.files import DiskFullError, NotWritableError

    if device is Device.cuda and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available here; use --device cpu", param_hint="--device")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device is Device.auto else device.value

    paths = find_audio_files(data, filelist, text_extension)
    if not paths:
        typer.echo(f"No audio files found under {data}.", err=True)
        raise typer.Exit(1)
    try:
        shape = config if config is not None else preset.value if preset is not None else None
        model = load_codec(checkpoint_path, shape, device=device, decoder=False)
        check_finite_weights(model)
    except (CodecCheckpointError, ValueError, RuntimeError) as error:
        typer.echo(f"Cannot load codec {checkpoint_path}: {error}", err=True)
        raise typer.Exit(2) from None

    batch_size, max_batch_seconds = batching_for(device, batch_size, max_batch_seconds)
    settings = ExtractSettings(
        batch_size=batch_size, num_workers=num_workers, max_seconds=max_seconds,
        dtype=dtype.value, overwrite=overwrite, max_batch_seconds=max_batch_seconds,
    )
    model_hash = codec_hash(model)
    typer.echo(f"Checking {len(paths)} audio files under {data} ...")
    plan = plan_extraction(paths, model, settings, model_hash)

    from rich.console import Console
    from rich.markup import escape

    from fish_speech_core.progress import progress_bar

    console = Console(stderr=True)
    # Counted in seconds of audio, not files: the ETA holds when clip lengths vary (its rate
    # reads as times real time); the note counts files.
    with progress_bar(console=console) as progress:
        task = progress.add_task("extract", total=plan.todo_seconds, unit="s audio",
                                 note=f"0/{len(plan.todo)} files")
        done = 0

        def on_result(result) -> None:
            nonlocal done
            done += 1
            progress.update(task, advance=result.seconds, note=f"{done}/{len(plan.todo)} files")

        try:
            summary = run_extraction(model, plan, settings, model_hash, on_result)
        except (DiskFullError, NotWritableError) as error:  # files finished before it are kept and skipped by a rerun
            progress.stop()
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(1) from None

    for result in summary.results:
        if result.status in ("rejected", "failed"):
            rel = result.audio_path.relative_to(data) if result.audio_path.is_relative_to(data) else result.audio_path
            console.print(f"[yellow]{result.status}[/yellow] {escape(str(rel))}: {escape(result.reason)}")
    hours = summary.extracted_seconds / 3600
    speed = summary.speed
    pace = f" ({speed:.1f}x real time, RTF {1 / speed:.4f})" if speed else ""
    typer.echo(
        f"Extracted {summary.count('extracted')} files ({hours:.3f} h audio) in "
        f"{summary.wall_seconds:.1f} s on {device}{pace}; "
        f"skipped {summary.count('skipped')} up to date; rejected {summary.count('rejected')}; "
        f"failed {summary.count('failed')}."
    )
    if summary.count("failed") and not summary.count("extracted") and not summary.count("skipped"):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("init-codec")(init_codec_command)
    app.command("extract")(extract_command)
