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


# A no-op `fishtune extract` (every file up to date) in a fresh interpreter: what it loads beyond
# torch. Building the codec's decoder, random-initialising weights the checkpoint then replaces,
# or a meta-device op's Python decomposition (which imports torch._dynamo) cost ~3 s here.
NOOP_EXTRACT = """
import sys
from fishtune.cli import app
from typer.main import get_command
args = ["extract", sys.argv[1], "--checkpoint-path", sys.argv[2], "--device", "cpu"]
try:
    get_command(app).main(args, prog_name="fishtune", standalone_mode=False)
except SystemExit as stop:
    assert not stop.code, stop.code
print(sorted(m for m in ("torch._dynamo", "prefect", "lightning", "peft") if m in sys.modules))
"""


def test_noop_extract_loads_no_decoder_and_no_compiler(tmp_path, reference):
    import shutil

    from fish_speech_core.codec import FireflyConfig, init_codec, save_codec

    codec = tmp_path / "codec.pth"
    save_codec(init_codec(FireflyConfig.from_name("tiny")), codec)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(reference / "firefly" / "c.wav", data / "c.wav")
    (data / "c.lab").write_text("hello")
    first = subprocess.run([sys.executable, "-c", NOOP_EXTRACT, str(data), str(codec)],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Extracted 1 files" in first.stdout + first.stderr
    again = subprocess.run([sys.executable, "-c", NOOP_EXTRACT, str(data), str(codec)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipped 1 up to date" in again.stdout + again.stderr
    assert again.stdout.strip().splitlines()[-1] == "[]"


def test_the_modules_warmed_while_the_server_starts_exist():
    """The demo imports these while Prefect's server starts; a renamed one would stop the demo."""
    import importlib.util

    from fishtune.cli.flows import STAGE_IMPORTS

    assert [name for name in STAGE_IMPORTS if importlib.util.find_spec(name) is None] == []


# Making and loading the models on the meta device (init-base, every load_pretrained, the doctor's
# shape check) in a fresh interpreter: a default init or a rope table computed on meta runs a
# Python decomposition that imports torch._dynamo and sympy (1-4 s).
MODELS_ON_META = """
import sys
from pathlib import Path
from fish_speech_core.lm.config import PRESETS
from fish_speech_core.lm.init_base import init_base
from fish_speech_core.lm.checkpoint import load_pretrained
made = init_base(Path(sys.argv[1]), PRESETS["tiny"], seed=0)
loaded = load_pretrained(Path(sys.argv[1])).model
assert all((a == b).all() for a, b in zip(made.state_dict().values(), loaded.state_dict().values()))
assert (loaded.rope == made.rope).all() and loaded.rope.device.type == "cpu"
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""


def test_models_built_on_meta_import_no_compiler(tmp_path):
    done = subprocess.run([sys.executable, "-c", MODELS_ON_META, str(tmp_path / "base")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
