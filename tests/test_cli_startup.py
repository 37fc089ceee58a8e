"""CLI start-up: help screens import none of the heavy libraries (each costs seconds here)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "prefect", "lightning", "peft", "transformers", "resemblyzer", "librosa", "matplotlib")

# One fresh interpreter renders the root help and the heaviest commands' (each help costs
# ~0.4 s here), then lists which heavy modules got in.
SCRIPT = f"""
import contextlib, io, json, sys
from typer.main import get_command
from fishtune.cli import app
cli = get_command(app)
assert len(cli.commands) > 10
for args in [["--help"]] + [[name, "--help"] for name in ("validate", "demo", "train", "synthesize", "finetune")]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main(args, prog_name="fishtune", standalone_mode=False)
        except SystemExit:
            pass
    assert "Usage" in out.getvalue(), (args, out.getvalue()[:300])
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def test_help_screens_import_no_heavy_library():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
