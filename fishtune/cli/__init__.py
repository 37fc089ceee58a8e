"""The ``fishtune`` console script.

Each stage keeps its commands in its own module with a ``register(app)`` function, so the
modules stay short and heavy imports (torch, prefect) happen only inside the command that
needs them: ``fishtune --help`` stays fast.
"""

import typer

from fishtune.cli import codec, data, doctor, flows, lm, pack, synth, train

app = typer.Typer(
    name="fishtune",
    help="Finetune Fish Speech 1.4 on your own voice recordings: validate, normalize, "
    "extract, pack, train, merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for module in (data, codec, pack, lm, synth, train, flows, doctor):
    module.register(app)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the fishtune version and exit."),
) -> None:
    if version:
        from fishtune import __version__

        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    app()
