"""The ``fishtune`` console script.

Each stage keeps its commands in its own module with a ``register(app)`` function, so the
modules stay short and heavy imports (torch, prefect) happen only inside the command that
needs them: ``fishtune --help`` stays fast.
"""

import atexit
import gc
import os
import sys

import typer

from fishtune.cli import codec, data, doctor, flows, lm, pack, project, synth, train

app = typer.Typer(
    name="fishtune",
    help="Finetune Fish Speech 1.4 on your own voice recordings: validate, normalize, "
    "extract, pack, train, merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # main() turns an unexpected error into one line, never a traceback
)

for module in (data, codec, pack, lm, synth, train, flows, project, doctor):
    module.register(app)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the fishtune version and exit."),
) -> None:
    if version:
        from fishtune import __version__

        typer.echo(__version__)
        raise typer.Exit()


DEBUG_ENV = "FISHTUNE_DEBUG"


def unexpected_error_line(exc: BaseException) -> str:
    """One line for an error no command anticipated: its type and first line, credentials removed."""
    from fish_speech_core.storage import redact_text

    lines = str(exc).strip().splitlines()
    detail = redact_text(lines[0][:500]) if lines else ""
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return f"fishtune: error: {what} (unexpected; rerun with {DEBUG_ENV}=1 for the traceback and report it)"


def main() -> None:
    """The console script: every command's own errors are one line; so is anything unforeseen."""
    # No last full garbage collection at exit: after a flow it frees every object left in a
    # reference cycle (hundreds of httpx clients' SSL contexts, each a parsed CA store), 3-8 s on 2
    # busy cores (py-spy: gc_collect_main > SSL_CTX_free); the OS takes the memory back at once.
    # Registered before the command runs, so the handlers it registers (Prefect's server stop, log
    # flushes, temp-folder cleanup) run before it and collect as usual; the std streams are flushed after.
    atexit.register(gc.freeze)
    try:
        app()
    except KeyboardInterrupt:
        print("fishtune: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - a traceback shown to a user is a bug; this is the last net
        if os.environ.get(DEBUG_ENV):
            raise
        print(unexpected_error_line(exc), file=sys.stderr)
        raise SystemExit(1) from None
