"""Typer options generated from a pydantic model: names, help, defaults, choices, errors by flag."""

import re
from enum import Enum

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from fishtune.cli.model_options import command_from_model, model_options, option_flags

runner = CliRunner()


class Color(str, Enum):
    red = "red"
    blue = "blue"


class Inner(BaseModel):
    gain: float = Field(-1.0, le=0.0, description="Gain in dB.")


class Config(BaseModel):
    name: str = Field(..., min_length=1, description="A name.")
    count: int = Field(3, ge=1, description="How many.")
    color: Color = Field(Color.red, description="Which color.")
    label: str | None = Field(None, description="Optional label.")
    limit: int | None = Field(None, ge=0, description="Optional limit.")
    loud: bool = Field(False, description="Be loud.")
    quiet: bool = Field(True, description="Be quiet.")
    inner: Inner = Field(default_factory=Inner, description="Inner settings.")


def _app(names=None):
    app = typer.Typer()
    seen = []

    @app.command()
    @command_from_model(Config, model_options(Config, names))
    def main(config: Config) -> None:
        """Do it."""
        seen.append(config)

    return app, seen


def _plain(text: str) -> str:
    return " ".join(re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", text).split())


def test_every_field_is_an_option_with_its_description_and_default():
    options = model_options(Config, {"quiet": "--quiet/--chatty"})
    assert option_flags(options) == {
        "name": "--name", "count": "--count", "color": "--color", "label": "--label", "limit": "--limit",
        "loud": "--loud", "quiet": "--quiet", "inner.gain": "--gain",
    }
    app, seen = _app({"quiet": "--quiet/--chatty"})
    text = _plain(runner.invoke(app, ["--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output)
    for piece in ("--count", "How many. [default: 3]", "red|blue", "--loud --no-loud", "--quiet --chatty",
                  "Inner settings", "--gain", "Gain in dB. [default: -1.0]", "Do it."):
        assert piece in text, piece

    assert runner.invoke(app, ["--name", "x"]).exit_code == 0
    assert seen[-1] == Config(name="x")
    done = runner.invoke(app, ["--name", "y", "--count", "5", "--color", "blue", "--label", "l", "--limit", "0",
                               "--loud", "--chatty", "--gain", "-3"])
    assert done.exit_code == 0, done.output
    assert seen[-1] == Config(name="y", count=5, color=Color.blue, label="l", limit=0, loud=True, quiet=False,
                              inner=Inner(gain=-3.0))


def test_bad_values_are_reported_together_by_flag():
    app, seen = _app()
    result = runner.invoke(app, ["--name", "", "--count", "0", "--gain", "2"], env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert result.exit_code == 2 and not seen
    text = _plain(result.output)
    assert "--name: String should have at least 1 character" in text
    assert "--count: Input should be greater than or equal to 1" in text
    assert "--gain: Input should be less than or equal to 0" in text
    assert "'green' is not one of 'red', 'blue'" in _plain(runner.invoke(app, ["--name", "x", "--color", "green"]).output)


def test_a_field_without_an_option_form_or_a_clash_fails_at_once():
    class Listy(BaseModel):
        items: list[str] = []

    with pytest.raises(TypeError, match=r"Listy.items: type .* has no CLI option form"):
        model_options(Listy)

    class Clash(BaseModel):
        gain: float = 0.0
        inner: Inner = Inner()

    with pytest.raises(TypeError, match="fields gain and inner.gain share the parameter gain"):
        model_options(Clash)
    with pytest.raises(TypeError, match=r"does not have: \['nope'\]"):
        model_options(Config, {"nope": "--nope"})
