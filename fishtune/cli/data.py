"""Dataset commands: validate, normalize, pack."""

import typer


def register(app: typer.Typer) -> None:
    pass
