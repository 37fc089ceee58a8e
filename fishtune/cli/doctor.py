"""``fishtune doctor``: versions, GPU, base/codec compatibility, storage — each problem with a fix."""

from __future__ import annotations

from pathlib import Path

import typer

_STYLE = {"ok": ("ok", "green"), "info": ("info", "cyan"), "warning": ("warn", "yellow"),
          "error": ("ERROR", "red")}


def doctor(
    base: Path | None = typer.Option(
        None, "--base", help="Base checkpoint folder (config.json, model.pth, tokenizer.json) to "
        "check, e.g. checkpoints/fish-speech-1.4.", file_okay=False,
    ),
    codec: str | None = typer.Option(
        None, "--codec", help="Codec checkpoint (.pth) or codec preset name; with --base, checks "
        "that the two belong together (codebook count and size).",
    ),
    storage: str | None = typer.Option(
        None, "--storage", help="Storage root to test for writing: a local folder or s3://bucket/prefix "
        "(credentials from the environment).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON instead of a table."),
) -> None:
    """Check the environment and the files a finetune needs; exit 1 if anything is an error."""
    from fish_speech_core.doctor import Finding, has_errors, run_checks, to_json
    from fishtune.setup_check import FIX, QUICK, check

    # Packages that are installed but do not load (torchaudio built for another torch) come first.
    problems = check(QUICK)
    broken = [Finding("error", f"{b.distribution} {b.version} does not import: {b.error}", FIX) for b in problems]
    torch_broken = any(b.distribution == "torch" for b in problems)  # every other check needs torch
    findings = broken + ([] if torch_broken else run_checks(base, codec, storage))
    if as_json:
        typer.echo(to_json(findings))
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table("", "finding", "what to do", show_lines=False)
        for f in findings:
            label, colour = _STYLE[f.level]
            table.add_row(f"[{colour}]{label}[/{colour}]", Text(f.what), Text(f.what_to_do))
        console = Console(width=160)
        console.print(table)
        errors = sum(f.level == "error" for f in findings)
        warnings = sum(f.level == "warning" for f in findings)
        console.print(f"{errors} error(s), {warnings} warning(s)")
    if has_errors(findings):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
