"""fishtune as a distribution: the lock, declared dependencies, the package namespace, a wheel install."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_TREES = ("fish_speech_core", "fishtune", "tasks", "flows", "deployments", "examples")
# Declared but never imported by name: loaded as plugins by what we do import.
PLUGINS = {"s3fs": "fsspec's s3:// protocol", "tensorboard": "Lightning's TensorBoardLogger"}


def _imports(trees: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for tree in trees:
        for path in (ROOT / tree).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_no_module_imports_top_level_tasks_or_flows():
    # Installed, they are fishtune.tasks / fishtune.flows; a bare `tasks` would be a user's module.
    imports = _imports((*RUNTIME_TREES, "tests", "bench"))
    assert "tasks" not in imports and "flows" not in imports, {k: imports.get(k) for k in ("tasks", "flows")}


def test_every_imported_distribution_is_declared_and_every_declared_one_is_used():
    declared = {_canonical(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    optional = {_canonical(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["asr"]}
    owners = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    imported: dict[str, set[str]] = {}
    for module, files in _imports(RUNTIME_TREES).items():
        if module in stdlib or module in {"fish_speech_core", "fishtune"}:
            continue
        assert module in owners, f"{module} (imported by {sorted(files)}) belongs to no installed distribution"
        for dist in owners[module]:
            imported.setdefault(_canonical(dist), set()).update(files)
    undeclared = {d: sorted(f) for d, f in imported.items() if d not in declared | optional}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = declared - set(imported) - set(PLUGINS)
    assert not unused, f"declared in pyproject.toml but imported nowhere: {sorted(unused)}"


def test_the_makefile_bootstraps_the_uv_the_lock_pins():
    pinned = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"] if r.startswith("uv")]
    make_version = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert [str(r.specifier) for r in pinned] == [f"=={make_version}"]
    lock = (ROOT / "uv.lock").read_text()
    assert f'name = "uv"\nversion = "{make_version}"' in lock


def test_the_torch_pair_is_exact_in_pyproject_and_the_lock():
    deps = {Requirement(r).name: str(Requirement(r).specifier) for r in PYPROJECT["project"]["dependencies"]}
    assert deps["torch"] == "==2.11.0" and deps["torchaudio"] == "==2.11.0"
    lock = (ROOT / "uv.lock").read_text()
    assert 'name = "torch"\nversion = "2.11.0"' in lock and 'name = "torchaudio"\nversion = "2.11.0"' in lock


def test_the_lock_agrees_with_pyproject():
    # The same check `make` runs before installing: a pyproject edit without `make lock` fails here.
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or "uv"
    done = subprocess.run([uv, "lock", "--locked", "--offline"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_setup_check_names_the_broken_package_in_one_line(capsys):
    from fishtune import setup_check

    broken = (("torch", ("torch",)), ("no-such-dist", ("fishtune_missing_module",)))
    assert setup_check.main(broken) == 1
    assert capsys.readouterr().err.splitlines() == [
        "fishtune setup: no-such-dist (not installed) does not import (ModuleNotFoundError: No module named "
        "'fishtune_missing_module'); reinstall from the lock: `make clean-venv && make test` "
        "(or `uv sync --locked --extra test`)"
    ]
    # a compiled part that fails to load (what torchaudio 2.11.1 beside torch 2.11.0 does) is one line too
    (item,) = setup_check.check((("torch", ("torch.no_such_extension",)),))
    assert item.distribution == "torch" and item.version == "2.11.0" and "\n" not in item.line()


@pytest.mark.slow
def test_wheel_installs_from_the_lock_and_runs_the_demo_outside_the_repository(tmp_path):
    """Build the wheel, install it with the locked dependencies into a fresh venv, run the demo elsewhere
    (this is also the demo's end-to-end test: `make demo` runs the same command)."""
    import json

    from fish_speech_core.lm.checkpoint import load_pretrained

    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    assert uv, "uv comes with the test extra"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_PROJECT", "VIRTUAL_ENV", "PYTHONPATH"))}
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    work.mkdir()

    def run(*args, cwd=tmp_path, timeout=900):
        done = subprocess.run([*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    # sdist first, then the wheel from the sdist: what a user installs is built from what we publish
    run(uv, "build", "--out-dir", str(dist), str(ROOT))
    (wheel,) = dist.glob("fishtune-*.whl")
    requirements = tmp_path / "requirements.txt"
    run(uv, "export", "--frozen", "--no-emit-project", "--no-dev", "--output-file", str(requirements), cwd=ROOT)
    run(uv, "venv", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    # no --compile-bytecode (make's install has it): compiling all of torch's sources is ~100 s of CPU
    # here, and what the demo imports is compiled on first import anyway
    run(uv, "pip", "install", "--python", str(python), "-r", str(requirements))
    run(uv, "pip", "install", "--python", str(python), "--no-deps", str(wheel))

    # Inside the fishtune namespace only: no top-level `tasks` / `flows` in site-packages.
    for name in ("tasks", "flows", "deployments", "examples"):
        probe = subprocess.run([str(python), "-c", f"import {name}"], cwd=work, env=env, capture_output=True)
        assert probe.returncode != 0, f"`import {name}` works in a wheel install"
    where = run(str(python), "-c", "import fishtune.flows.finetune as f, fishtune.cli.flows as c; "
                "print(f.__file__); print(c.DEMO_DATA); print(c.PREFECT_FILE)", cwd=work).stdout.split()
    site = str(venv / "lib")
    assert all(path.startswith(site) for path in where), where
    assert sorted(p.name for p in Path(where[1]).iterdir()) == ["alice", "bruno", "carmen"]
    assert "fishtune.flows.finetune:finetune" in Path(where[2]).read_text()
    check = run(str(python), "-m", "fishtune.setup_check", cwd=work).stdout  # what make runs after installing
    assert check.startswith("fishtune setup: ok (torch 2.11.0, torchaudio 2.11.0, prefect ")

    # The README's main job from the installed wheel, in a folder that is not the checkout, in a fresh
    # process: ephemeral Prefect (no server of the test session), tiny models made on the fly.
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_")} | {"COLUMNS": "200"}
    demo = run(str(venv / "bin" / "fishtune"), "demo", "--max-steps", "20", cwd=work, timeout=1200).stderr
    out = work / "demo-output"
    store = out / "store"
    models = list((store / "models" / "demo").glob("*/model.pth"))
    assert len(models) == 1 and models[0].stat().st_size > 0, demo[-2000:]
    merged = Path(re.search(r"Merged model: (\S+)", demo).group(1))
    report = Path(re.search(r"Report: +(\S+)", demo).group(1))
    recommended = re.search(r"Recommended checkpoint: (\S+)", demo).group(1)
    assert merged == models[0].parent and (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert load_pretrained(merged).model.config.n_layer == 2
    assert report.is_file() and report.parent.parent == store / "runs"
    text = report.read_text()
    assert "| alice |" in text and Path(recommended).is_file() and Path(recommended).name in text
    # previews of the base and the 2 checkpoints, scored; their pick was merged
    assert "## Previews" in text and "| base |" in text and "| step_000000020 |" in text
    assert "**Merged checkpoint (previews):** step" in text
    scores = json.loads(next((store / "evaluate").glob("*/scores.json")).read_text())
    assert [r["step"] for r in scores["summary"]["rows"]] == [0, 10, 20]
    assert all(list((store / "evaluate").glob(f"*/{p}")) for r in scores["summary"]["rows"] for p in r["previews"])
    plot = next((store / "evaluate").glob("*/plot.png"))  # the loss/similarity plot, published and named
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"Plot: `{plot}`" in text  # a local file is no UI image
    assert json.loads((merged / "lineage.json").read_text())["adapter"] == scores["checkpoint"]
    assert (out / "prefect-home").is_dir()  # Prefect's state stayed under the demo's output
    assert re.search(r"^train .* 20/20 steps", demo, re.M)  # training progress was shown (its final bar)

    # The unchanged rerun is answered from the store (~2 s): the same table, every stage up to
    # date, the same merged model, and no Prefect server started, no new run recorded.
    runs = sorted(p.name for p in (store / "runs").iterdir())
    again = run(str(venv / "bin" / "fishtune"), "demo", "--max-steps", "20", cwd=work, timeout=300).stderr
    assert "every stage up to date" in again and "Starting temporary server" not in again, again[-2000:]
    stages = re.findall(r"^│ (\w+) +│ up to date │", again, re.M)
    assert stages == ["validate", "normalize", "extract", "pack", "train", "evaluate", "merge"], again[-2000:]
    assert Path(re.search(r"Merged model: (\S+)", again).group(1)) == merged
    assert sorted(p.name for p in (store / "runs").iterdir()) == runs


def test_doctor_reports_a_package_that_does_not_import(monkeypatch):
    import json

    from typer.testing import CliRunner

    from fishtune import setup_check
    from fishtune.cli import app

    monkeypatch.setattr(setup_check, "QUICK", (*setup_check.QUICK, ("torchaudio", ("torchaudio._no_such_ext",))))
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 1
    errors = [f for f in json.loads(result.stdout) if f["level"] == "error"]
    assert errors == [{"level": "error", "what": "torchaudio 2.11.0 does not import: ModuleNotFoundError: No module "
                       "named 'torchaudio._no_such_ext'", "what_to_do": setup_check.FIX}]
