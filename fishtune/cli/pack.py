"""``fishtune pack``: transcripts + semantic codes -> ``.protos`` training shards."""

from __future__ import annotations

from pathlib import Path

import typer


def pack_command(
    inputs: list[Path] = typer.Option(
        ..., "--input", "-i",
        help="Data folder with one sub-folder per speaker holding <stem>.lab + <stem>.npy "
        "(repeat --input for several folders).",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder for the shards 00000000.protos, 00000001.protos, ..."
    ),
    text_extension: str = typer.Option(
        ".lab", "--text-extension", help="Extension of the transcript files, with the dot."
    ),
    num_workers: int | None = typer.Option(
        None, "--num-workers", "-j", min=1, show_default="one per 1000 items, at most CPU count and 8",
        help="Worker processes that read and encode the items (transcript + codes); the output is identical for any number. "
        "Small packs run faster in one process (starting workers costs more than it saves).",
    ),
    shard_size: float = typer.Option(
        10.0, "--shard-size", min=0.001,
        help="Start a new shard once the current one is larger than this many MiB.",
    ),
    filelist: Path | None = typer.Option(
        None, "--filelist",
        help="Read items from a filelist 'audio_path|speaker|language|text' (paths relative to "
        "the single --input folder; codes are <audio stem>.npy beside the audio).",
    ),
) -> None:
    """Pack every speaker's transcripts and codes into protobuf shards for training."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fish_speech_core.files import DiskFullError, NotWritableError
    from fish_speech_core.pack import default_pack_workers, discover_folder, pack
    from fish_speech_core.parallel import default_workers
    from fish_speech_core.progress import progress_bar

    console = Console(stderr=True)
    for path in inputs:
        if not path.is_dir():
            raise typer.BadParameter(f"{path} is not a folder", param_hint="--input")
    if filelist is not None and not filelist.is_file():
        raise typer.BadParameter(f"{filelist} does not exist", param_hint="--filelist")
    if filelist is not None and len(inputs) != 1:
        raise typer.BadParameter(
            "give exactly one --input with --filelist: the folder its audio paths are relative to",
            param_hint="--input",
        )
    if not text_extension.startswith("."):
        raise typer.BadParameter(f"use a leading dot, e.g. .{text_extension}", param_hint="--text-extension")

    total = None
    if filelist is None:
        total = sum(len(g.items) for root in inputs for g in discover_folder(root, text_extension)[0])
        if total == 0:
            console.print(f"[red]No *{escape(text_extension)} transcripts found in {escape(', '.join(map(str, inputs)))}.[/]")
            raise typer.Exit(1)
    num_workers = num_workers or default_pack_workers(total, default_workers())

    with progress_bar(transient=True, console=console) as progress:  # the summary table follows
        task = progress.add_task("pack", total=total, unit="sentences")
        try:
            summary = pack(
                inputs, output, text_extension=text_extension, num_workers=num_workers,
                shard_size_mb=shard_size, filelist=filelist,
                on_progress=lambda n: progress.advance(task, n),
            )
        except (ValueError, FileNotFoundError, DiskFullError, NotWritableError) as err:
            console.print(f"[red]pack failed:[/] {escape(str(err))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None

    table = Table(title=f"pack -> {escape(str(output))}", show_header=False)
    for name, value in (
        ("speakers", summary.speakers),
        ("sentences", summary.sentences),
        ("frames", summary.frames),
        ("shards", len(summary.shards)),
        ("bytes", summary.bytes_written),
        ("rejected items", len(summary.rejects)),
    ):
        table.add_row(name, str(value))
    console.print(table)
    for reject in summary.rejects:  # names and reasons are untrusted text: never markup
        console.print(f"[yellow]rejected[/] {escape(reject.item)}: {escape(reject.reason)}", soft_wrap=True, highlight=False)
    for path in summary.removed_stale:
        console.print(f"removed stale shard {path} from an earlier pack", markup=False)
    if not summary.shards:
        console.print("[red]Nothing was packed: every item was rejected (see above).[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("pack")(pack_command)
