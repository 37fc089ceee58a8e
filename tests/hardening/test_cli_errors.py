"""The console script's last net: an error no command anticipated is one line, credentials removed."""

import subprocess
import sys

import pytest

import fishtune.cli as cli
from fish_speech_core.storage import redact_text


def _raise(exc):
    def app():
        raise exc
    return app


def test_an_unexpected_error_is_one_line_without_a_traceback_or_secret(monkeypatch, capsys):
    monkeypatch.setattr(cli, "app", _raise(RuntimeError("cannot reach s3://AKIAX:se/cr+et@bucket/p\nsecond line")))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "fishtune: error: RuntimeError: cannot reach s3://***@bucket/p (unexpected; rerun with FISHTUNE_DEBUG=1 "
        "for the traceback and report it)"
    ]


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(cli, "app", _raise(ValueError("boom")))
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="boom"):
        cli.main()


def test_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setattr(cli, "app", _raise(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130 and capsys.readouterr().err == "fishtune: interrupted\n"


def test_redact_text_removes_user_info_of_every_url():
    text = "a s3://K:S/x+y@b/p, b https://u:p@h/x and s3://plain/key; c 's3://K@b'"
    assert redact_text(text) == "a s3://***@b/p, b https://***@h/x and s3://plain/key; c 's3://***@b'"


def test_usage_errors_stay_click_errors():
    done = subprocess.run([sys.executable, "-m", "fishtune", "validate"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Missing argument" in done.stderr
