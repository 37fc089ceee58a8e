"""Dataset commands: validate, normalize."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fish_speech_core.choices import AudioFormat

console = Console(stderr=True)

MAX_SECONDS_HELP = "Reject audio longer than this many seconds (long clips waste memory and rarely align well)."


def _print_validation(summary: dict) -> None:
    table = Table(title=Text(f"Dataset {summary['root']}"))
    for column in ("speaker", "accepted", "rejected", "minutes"):
        table.add_column(column, justify="left" if column == "speaker" else "right")
    for name, row in summary["speakers"].items():
        table.add_row(Text(name), str(row["accepted"]), str(row["rejected"]), f"{row['hours'] * 60:.2f}")
    table.add_row("[bold]total", str(summary["accepted"]), str(summary["rejected"]), f"{summary['total_hours'] * 60:.2f}")
    console.print(table)
    if summary["rejects"]:
        rejects = Table(title="Rejected files")
        rejects.add_column("file")
        rejects.add_column("reason")
        rejects.add_column("detail")
        for r in summary["rejects"]:
            rejects.add_row(Text(r["path"]), Text(r["reason"]), Text(r["detail"]))
        console.print(rejects)
        counts = ", ".join(f"{reason}: {n}" for reason, n in summary["rejects_by_reason"].items())
        console.print(f"Rejects by reason: {counts}", markup=False)
    for note in summary["advice"]:
        console.print(f"[yellow]warning:[/yellow] {escape(note)}")


def _data_dir(path: Path) -> Path:
    if not path.is_dir():
        raise typer.BadParameter(f"{path} is not a folder (expected speaker folders of audio + .lab files)")
    return path


def _report_outside(report: Path | None, inputs: list[tuple[str, Path]]) -> None:
    """A report is an output too: never written into (or over) the dataset."""
    from fish_speech_core.files import OverlapError, refuse_overlap

    if report is not None:
        try:
            refuse_overlap(inputs, report, "--report")
        except OverlapError as err:
            raise typer.BadParameter(str(err), param_hint="--report") from None


def validate_command(
    data: Path = typer.Argument(..., help="Dataset root: one folder per speaker with audio + transcript files."),
    filelist: Path | None = typer.Option(
        None, "--filelist", help="VITS-style filelist (path|speaker|language|text), paths relative to DATA.", exists=True, dir_okay=False
    ),
    report: Path | None = typer.Option(None, "--report", help="Write the manifest (Parquet) here. Default: DATA-manifest.parquet beside DATA."),
    strict: bool = typer.Option(False, "--strict", help="Exit with status 1 if any file is rejected."),
    text_extension: str = typer.Option(".lab", "--text-extension", help="Transcript file extension."),
    max_seconds: float = typer.Option(30.0, "--max-seconds", min=0.5, help=MAX_SECONDS_HELP),
    num_workers: int = typer.Option(1, "--num-workers", min=1, help="Worker processes that decode and check the files (1: in this process)."),
) -> None:
    """Check a dataset and write its manifest: every file accepted, or rejected with a reason."""
    from fish_speech_core.validate import ValidationSettings, validate

    data = _data_dir(data)
    _report_outside(report, [("DATA", data)])
    try:
        result = validate(data, filelist, ValidationSettings(text_extension, max_seconds), num_workers)
    except ValueError as exc:  # the filelist itself is unreadable; bad entries are rejected rows
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    report = report or data.absolute().parent / f"{data.absolute().name}-manifest.parquet"
    from fish_speech_core.files import DiskFullError, NotWritableError

    try:
        result.write_parquet(report)
    except (DiskFullError, NotWritableError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))} (the manifest --report)", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    _print_validation(result.summary())
    console.print(f"Manifest: {escape(str(report))}")
    if strict and result.rejected:
        console.print(f"[red]--strict: {len(result.rejected)} file(s) rejected; fix or remove them and rerun.")
        raise typer.Exit(1)


def normalize_command(
    input: Path = typer.Argument(..., help="Dataset root to read (never modified)."),
    output: Path = typer.Argument(..., help="Folder to write the normalized copy into (mirrors INPUT, transcripts included)."),
    peak: float = typer.Option(-1.0, "--peak", max=0.0, help="Peak target in dBFS for the first step; also the anti-clipping ceiling."),
    loudness: float = typer.Option(-23.0, "--loudness", max=0.0, help="Integrated loudness target in LUFS (ITU-R BS.1770-4)."),
    block_size: float = typer.Option(0.4, "--block-size", min=0.1, help="Loudness gating block in seconds."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="Worker processes that check, measure and write the files (0: one per CPU core)."),
    clean: bool = typer.Option(False, "--clean", help="Empty OUTPUT first (only OUTPUT)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every file, even those already up to date."),
    format: AudioFormat = typer.Option(AudioFormat.keep, "--format", help="Output format: keep (same as input), flac or wav."),
    prevent_clipping: bool = typer.Option(
        True, "--prevent-clipping/--allow-clipping", help="Scale files whose gain would clip down to the --peak ceiling."
    ),
    filelist: Path | None = typer.Option(None, "--filelist", help="Read items from a filelist instead of folders.", exists=True, dir_okay=False),
    text_extension: str = typer.Option(".lab", "--text-extension", help="Transcript file extension."),
    max_seconds: float = typer.Option(30.0, "--max-seconds", min=0.5, help=MAX_SECONDS_HELP),
    report: Path | None = typer.Option(None, "--report", help="Write the JSON report here. Default: OUTPUT/.fishtune/normalize-report.json"),
) -> None:
    """Loudness-normalize a dataset into OUTPUT: peak to --peak dBFS, then gain to --loudness LUFS."""
    from fish_speech_core.files import DiskFullError, NotWritableError
    from fish_speech_core.normalize import NormalizeSettings, STATE_DIR, normalize_tree, write_report
    from fish_speech_core.parallel import default_workers
    from fish_speech_core.validate import ValidationSettings

    _data_dir(input)
    _report_outside(report, [("INPUT", input)])
    try:
        result = normalize_tree(
            input,
            output,
            NormalizeSettings(peak, loudness, block_size, format.value, prevent_clipping),
            ValidationSettings(text_extension, max_seconds),
            filelist,
            num_workers or default_workers(),
            clean,
            overwrite,
        )
    except ValueError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    except (DiskFullError, NotWritableError) as exc:  # files finished before it are kept and skipped by a rerun
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    try:
        report_path = write_report(result, report or Path(output) / STATE_DIR / "normalize-report.json")
    except (DiskFullError, NotWritableError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))} (the --report)", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    s = result.summary()
    console.print(
        f"normalize: {s['written']} written, {s['skipped']} up to date, {len(s['rejected'])} rejected, "
        f"{len(s['failed'])} failed; {s['audio_seconds_written']:.1f} s of audio in {s['wall_seconds']:.1f} s"
    )
    for r in s["rejected"]:
        console.print(f"  rejected {escape(r['path'])}: {r['reason']} {escape(r['detail'])}", soft_wrap=True)
    for r in s["failed"]:
        console.print(f"  [red]failed[/red] {escape(r['path'])}: {escape(r['detail'])}", soft_wrap=True)
    for r in s["clipped"]:
        console.print(f"  clipped {escape(r['path'])}" + (" (scaled down to the peak ceiling)" if r["limited"] else " (left clipping)"))
    console.print(f"Report: {escape(str(report_path))}")
    if s["failed"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate_command)
    app.command("normalize")(normalize_command)
