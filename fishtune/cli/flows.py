"""Orchestrated commands: ``fishtune finetune`` (runs the Prefect flow) and ``fishtune deploy``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from importlib.resources import files
from pathlib import Path
from typing import Any

import typer

from fishtune.cli.model_options import command_from_model, model_options, option_flags, validated
from fishtune.cli.pools import PoolType
from fishtune.flows.config import FinetuneConfig, Preset

# Package data, so the demo and deploy work the same from a wheel as from a checkout.
DEMO_DATA = Path(str(files("fishtune.examples") / "demo-data"))
PREFECT_FILE = Path(str(files("fishtune.deployments") / "prefect.yaml"))
# Every FinetuneConfig field is a `fishtune finetune` option named after it (nested normalize.x:
# --x); these keep their shorter, older names.
OPTION_NAMES = {
    "preview_sentences_per_speaker": "--preview-sentences", "preview_max_new_tokens": "--preview-max-tokens",
    "warm_start": "--warm-start/--from-base",
}
OPTIONS = model_options(FinetuneConfig, OPTION_NAMES)
FLAGS = option_flags(OPTIONS)  # pydantic field path -> CLI flag, so validation errors name the flag to fix


# Prefect's ephemeral server needs ~10 s on an idle laptop but timed out at its 90 s on a loaded
# 2-core machine (issue 12): the default is generous, and a user's own value always wins.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_STARTUP_TIMEOUT_S = 600


def _prefect_defaults() -> None:
    # Entry point only: quiet, offline-safe Prefect unless the user chose otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(EPHEMERAL_STARTUP_TIMEOUT_S))


def _is_ephemeral_startup_failure(err: BaseException) -> bool:
    # Prefect raises a plain RuntimeError with this text (prefect/server/api/server.py).
    return isinstance(err, RuntimeError) and "ephemeral Prefect API server" in str(err)


def _ephemeral_startup_message() -> str:
    limit = os.environ.get(STARTUP_TIMEOUT_ENV, str(EPHEMERAL_STARTUP_TIMEOUT_S))
    return (
        f"the temporary Prefect server did not start within {limit} s (a loaded machine starts it slowly): "
        f"raise {STARTUP_TIMEOUT_ENV} (e.g. {STARTUP_TIMEOUT_ENV}=1200) or start a server "
        "(prefect server start) and point PREFECT_API_URL at it"
    )


@command_from_model(FinetuneConfig, OPTIONS)
def finetune_command(config: FinetuneConfig) -> None:
    """Run the finetune flow (validate -> normalize -> ...) with caching; prints the report location."""
    from rich.console import Console

    _prefect_defaults()
    console = Console(stderr=True)
    _check_locks(config, console)
    server = _start_ephemeral_server()
    _run_and_print(config, console, lambda: _finetune_when_up(config, server))


def _check_locks(config: FinetuneConfig, console) -> None:
    """A set FISHTUNE_REDIS_URL that does not answer fails here, in one line, before any run starts."""
    from rich.markup import escape

    from fish_speech_core.storage import Store
    from fishtune.tasks.caching import LockServiceUnavailable, check_locks

    try:
        check_locks(Store(config.storage))
    except LockServiceUnavailable as err:
        console.print(f"[red]finetune failed:[/red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(1) from None


def _run_and_print(config: FinetuneConfig, console, run: Callable[[], Any]) -> dict:
    """Run the flow (``run``, returning its final state), print the stage table and where the
    report / merged model are; exit 1 on failure."""
    from rich.markup import escape
    from rich.text import Text

    from fish_speech_core.storage import redact, redact_text
    from fishtune.flows.report import cache_label

    try:
        state = run()
    except RuntimeError as err:
        if not _is_ephemeral_startup_failure(err):
            raise
        state = None  # Prefect raises it before or returns it as the run's failure: one message for both
    if state is None or not state.is_completed() and _is_ephemeral_startup_failure(_state_exception(state)):
        console.print(f"[red]finetune failed:[/red] {escape(_ephemeral_startup_message())}", soft_wrap=True)
        raise typer.Exit(1)
    if not state.is_completed():
        console.print(Text.assemble(("finetune failed: ", "red"), redact_text(state.message or "")), soft_wrap=True)
        console.print(f"The run manifest and report are under {redact(config.storage)}/runs/; rerun to resume "
                      "(finished stages come from cache, training continues from its last checkpoint).", markup=False)
        raise typer.Exit(1)
    result = state.result()
    rows = [(s["stage"], cache_label(s["stage"], s["cached"], s.get("summary") or {}), s["seconds"], s["url"])
            for s in result["stages"]]
    _print_outcome(console, f"finetune {config.project}: run {result['run_id']}", rows,
                   result.get("recommended_checkpoint"), result.get("merged_model"), result["report"], result["manifest"])
    return result


def _print_outcome(console, title: str, rows: list[tuple[str, str, float, str]], recommended: str | None,
                   merged: str | None, report: str, manifest: str) -> None:
    """The end of a run: the stage table (stage, cache, seconds, artifact) and where its outputs are."""
    from rich.table import Table
    from rich.text import Text

    from fish_speech_core.storage import redact

    table = Table(title=Text(title))
    for column in ("stage", "cache", "seconds", "artifact"):
        table.add_column(column)
    for stage, cache, seconds, url in rows:
        table.add_row(Text(stage), cache, f"{seconds:.2f}", Text(redact(url)))
    console.print(table)
    if recommended:
        console.print(f"Recommended checkpoint: {redact(recommended)}", soft_wrap=True, markup=False)
    if merged:
        console.print(f"Merged model: {redact(merged)}", soft_wrap=True, markup=False)
    console.print(f"Report:   {redact(report)}", soft_wrap=True, markup=False)
    console.print(f"Manifest: {redact(manifest)}", soft_wrap=True, markup=False)


def _print_up_to_date(config: FinetuneConfig, done, console) -> None:
    """An unchanged rerun answered from the store: the same table, every stage ``up to date``."""
    rows = [(s.stage, "up to date", seconds, s.url) for s, seconds in zip(done.stages, done.seconds)]
    _print_outcome(console, f"finetune {config.project}: every stage up to date (the artifacts of run {done.run_id})",
                   rows, done.chosen_checkpoint, done.merged_model, done.report, done.manifest)
    console.print(f"Nothing changed since run {done.run_id} (data, models, parameters, versions): every stage's "
                  "artifact is in the store, so no stage ran and no Prefect run was started. --always-run runs "
                  "the flow anyway (all Cached).", soft_wrap=True, markup=False)


def _state_exception(state) -> BaseException | None:
    try:
        state.result(raise_on_failure=True)
    except BaseException as err:  # noqa: BLE001 - we only look at it
        return err
    return None


def demo_command(
    output: Path = typer.Option(Path("demo-output"), "--output", help="Folder for everything the demo makes: tiny models, the store (artifacts, merged model, run report) and Prefect's home."),
    max_steps: int = typer.Option(20, "--max-steps", min=1, max=10_000, help="Training steps (the tiny preset validates and checkpoints every 10)."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Render and score previews of the base and each checkpoint (random models: the clips are noise or empty)."),
    preview_sentences: int = typer.Option(1, "--preview-sentences", min=1, max=20, help="Held-out sentences rendered per speaker and checkpoint with --evaluate (the finetune default is 3; 1 keeps the demo short)."),
    data: Path = typer.Option(DEMO_DATA, "--data", exists=True, file_okay=False, help="Dataset folder (one folder per speaker of audio + .lab transcripts)."),
    always_run: bool = typer.Option(False, "--always-run", help="Run the flow even when nothing changed since an earlier run (then every stage is Cached, and the run is recorded in Prefect). Without it such a rerun is answered from the store, without starting Prefect."),
) -> None:
    """Run the whole finetune flow on the demo data with a tiny random base model and codec (no download).

    Ephemeral Prefect (a temporary local server; the one PREFECT_API_URL names, if set), a local store under
    --output; about a minute on 2 CPU cores. A rerun with nothing changed is answered from the store
    (every stage up to date, no Prefect run) unless --always-run.
    The models are random, so the merged model speaks nonsense: the demo shows the pipeline, not a voice.
    """
    from rich.console import Console

    console = Console(stderr=True)
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    # Before Prefect is imported: its own home under --output (no user profile), no telemetry, and a
    # startup timeout that holds on a loaded 2-core machine. A server named by PREFECT_API_URL is
    # used as is (its start, ~half of an unchanged rerun, is skipped); without one, ephemeral mode.
    os.environ["PREFECT_HOME"] = str(output / "prefect-home")
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The temporary server otherwise imports every installed Prefect integration (prefect-docker,
    # prefect-kubernetes: 4-7 s CPU on 2 busy cores) to register their block types, which the
    # demo's flow never uses. Only the ephemeral server reads these; a user's value wins.
    os.environ.setdefault("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "false")
    os.environ.setdefault("PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION", "false")
    _prefect_defaults()

    base, codec = output / "models" / "base-tiny", output / "models" / "codec-tiny.pth"
    config = validated(FinetuneConfig, dict(
        data=str(data), project="demo", storage=str(output / "store"), base=str(base), codec=str(codec),
        preset=Preset.tiny, max_steps=max_steps, progress_every=5, evaluate=evaluate,
        preview_sentences_per_speaker=preview_sentences,
        # random models rarely stop on their own: every preview is this long (1.5 s of audio), and
        # rendering them was the largest part of the demo's evaluate stage
        preview_max_new_tokens=DEMO_PREVIEW_TOKENS,
    ), FLAGS)
    console.print(f"demo: finetune flow on {data} -> {output / 'store'} ({max_steps} training steps)", markup=False)
    missing = not (base / "model.pth").is_file() or not codec.is_file()
    if not always_run and not missing:
        from fishtune.flows.uptodate import up_to_date

        done = up_to_date(config)
        if done is not None:
            return _print_up_to_date(config, done, console)
    server = _start_ephemeral_server()  # its start overlaps the models being made and the flow's imports
    if missing:
        with console.status("making a tiny random base model and codec (seeded: the same bytes every time)"):
            _make_tiny_models(base, codec)

    _run_and_print(config, console, lambda: _finetune_when_up(config, server))


DEMO_PREVIEW_TOKENS = 32


def _make_tiny_models(base: Path, codec: Path) -> None:
    if not (base / "model.pth").is_file():
        from fish_speech_core.lm.config import PRESETS
        from fish_speech_core.lm.init_base import init_base

        init_base(base, PRESETS["tiny"], seed=0)
    if not codec.is_file():
        from fish_speech_core.codec import init_codec, save_codec
        from fish_speech_core.codec.config import FireflyConfig

        save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)


# What the stages import when they first run (each lazily, so a command that does not need them
# does not pay for them): ~7 s on 2 cores, most of it Lightning with torchmetrics and transformers.
STAGE_IMPORTS = ("pyloudnorm", "pyarrow.parquet", "lightning.pytorch", "lightning.pytorch.loggers", "peft",
                 "matplotlib.figure", "matplotlib.backends.backend_agg", "resemblyzer")


def _warm_imports(server: Future) -> None:
    """Import :data:`STAGE_IMPORTS` while Prefect's temporary server is still starting.

    That start is a separate process (7-12 s) the flow must wait for; the main thread, idle
    meanwhile, imports what the stages would import later, on the critical path. Stops as soon
    as the server is up (a configured server is up at once, so nothing is imported early).
    """
    import importlib

    for name in STAGE_IMPORTS:
        if server.done():
            return
        importlib.import_module(name)


def _finetune_when_up(config: FinetuneConfig, server: Future):
    """The finetune flow's final state, called once ``server`` (:func:`_start_ephemeral_server`) is up."""
    from fishtune.flows.finetune import finetune

    _warm_imports(server)
    server.result()  # a start that timed out raises here: _run_and_print says what to do
    return finetune(config, return_state=True)


def _start_ephemeral_server() -> Future:
    """Start Prefect's temporary server now, in a thread, and return when that is done.

    Its start (a process importing Prefect's server stack and migrating a new database: 7-12 s)
    otherwise begins only when the flow is called, after the models are made and the flow's
    modules imported; started first it runs beside them on the other core. It is the instance
    Prefect's client starts in ephemeral mode (one per process), so the flow finds it running.
    Nothing is started when a server is configured (PREFECT_API_URL) or ephemeral mode is off.
    A daemon thread: an interrupted demo does not wait for the start to finish.
    """
    import threading

    done: Future = Future()

    def start() -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

            if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                from prefect.server.api.server import SubprocessASGIServer

                SubprocessASGIServer().start()
            done.set_result(None)
        except BaseException as err:  # noqa: BLE001 - handed to the caller by done.result()
            done.set_exception(err)

    threading.Thread(target=start, name="prefect-server-start", daemon=True).start()
    return done


def _deployable(prefect_file: Path) -> tuple[list[str], list[str]]:
    """Deployment names whose entrypoint module is importable here, and those skipped."""
    import yaml

    spec = yaml.safe_load(prefect_file.read_text())
    ready, missing = [], []
    for deployment in spec.get("deployments", []):
        module = deployment["entrypoint"].split(":", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        (ready if found else missing).append(deployment["name"])
    return ready, missing


_ENV_PLACEHOLDER = re.compile(r"^\{\{\s*\$(\w+)\s*\}\}$")


def _drop_unset(parameters: dict, env: dict[str, str]) -> dict:
    kept = {}
    for name, value in parameters.items():
        match = _ENV_PLACEHOLDER.match(value) if isinstance(value, str) else None
        if match and match[1] not in env:
            continue
        kept[name] = _drop_unset(value, env) if isinstance(value, dict) else value
    return kept


def _with_set_parameters(prefect_file: Path, env: dict[str, str], folder: Path) -> Path:
    """``prefect_file``, or a copy in ``folder`` without the parameter defaults that are an unset
    ``{{ $NAME }}`` (prefect deploy would make them "", which the schema refuses: FISHTUNE_DATA)."""
    import yaml

    spec = yaml.safe_load(prefect_file.read_text())
    deployments = [{**d, "parameters": _drop_unset(d["parameters"], env)} if d.get("parameters") else d
                   for d in spec.get("deployments", [])]
    if deployments == spec.get("deployments", []):
        return prefect_file
    copy = folder / prefect_file.name
    copy.write_text(yaml.safe_dump({**spec, "deployments": deployments}, sort_keys=False))
    return copy


def deploy_command(
    storage: str = typer.Option(..., "--storage", help="Artifact store root for the deployed runs and the project specs the watch flow reads (FISHTUNE_STORAGE); use a location every worker can reach."),
    data: str | None = typer.Option(None, "--data", help="Default dataset of the plain finetune deployment (FISHTUNE_DATA). Optional: projects carry their own data."),
    prefect_file: Path = typer.Option(PREFECT_FILE, "--prefect-file", exists=True, dir_okay=False, help="The deployments file (default: the one installed with fishtune)."),
    create_pools: bool = typer.Option(True, "--create-pools/--no-create-pools", help="Create the work pools cpu (process) and cuda (--pool-type) when missing, and give a docker or kubernetes cuda pool fishtune's base job template."),
    pool_type: PoolType = typer.Option(PoolType.process, "--pool-type", case_sensitive=False, help="Worker type of the cuda pool: process (workers run GPU jobs as local processes), docker (a container per job with NVIDIA GPUs; needs the NVIDIA container toolkit) or kubernetes (a Job per run requesting nvidia.com/gpu). Container pools run the fishtune CUDA image (docker/Dockerfile.cuda); their workers need `pip install 'fishtune[pools]'`. The cpu pool is always a process pool."),
    gpus: int = typer.Option(1, "--gpus", min=1, max=4096, help="GPUs the cuda pool's workers have in all: slots of the global `gpu` concurrency limit every GPU child run takes."),
) -> None:
    """Create the work pools, the `gpu` concurrency limit and the deployments (finetune, finetune-project, its GPU stages, watch) on the Prefect server.

    Entry points are module paths (fishtune.flows.finetune:finetune): a worker needs fishtune
    installed (the Docker images, or the same lock), not a copy of this repository. An existing
    pool of another type is refused (delete it, or pass its type); a docker or kubernetes cuda
    pool gets fishtune's current template on every deploy.
    """
    from fish_speech_core.storage import CredentialsInURLError, refuse_credentials

    for flag, url in (("--data", data or ""), ("--storage", storage)):
        try:
            refuse_credentials(url)  # deployments store their environment on the server
        except CredentialsInURLError as err:
            raise typer.BadParameter(str(err), param_hint=flag) from None
    from prefect.settings import PREFECT_API_URL  # after the checks: importing Prefect is slow

    if not PREFECT_API_URL.value():
        raise typer.BadParameter(
            "deploy needs a running Prefect server: start one (prefect server start) and set PREFECT_API_URL"
        )
    prefect = [sys.executable, "-m", "prefect"]
    env = {**os.environ, "FISHTUNE_STORAGE": storage, **({"FISHTUNE_DATA": data} if data else {})}
    if create_pools:
        _pools(pool_type)
    _gpu_limit(gpus)
    ready, missing = _deployable(prefect_file)
    for name in missing:
        typer.echo(f"skipped deployment {name!r}: its flow module is not installed here", err=True)
    names = [arg for name in ready for arg in ("--name", name)]
    with tempfile.TemporaryDirectory() as tmp:
        deploy_file = _with_set_parameters(prefect_file.resolve(), env, Path(tmp))
        done = subprocess.run(
            [*prefect, "--no-prompt", "deploy", "--prefect-file", str(deploy_file), *names], env=env,
            cwd=prefect_file.resolve().parent,
        )
    if done.returncode:
        typer.echo("prefect deploy failed (see above)", err=True)
        raise typer.Exit(done.returncode)


def _pools(pool_type: PoolType) -> None:
    """Create / update the cpu and cuda pools; a pool of another type is one line saying what to do."""
    from prefect import get_client

    from fishtune.cli.pools import PoolTypeMismatch, ensure_pools

    with get_client(sync_client=True) as client:
        try:
            done = ensure_pools(client, pool_type)
        except PoolTypeMismatch as err:
            typer.echo(f"fishtune deploy: {err}", err=True)
            raise typer.Exit(1) from None
    for name, what in done.items():
        typer.echo(f"work pool {name!r}: {what}")


def _gpu_limit(slots: int) -> None:
    """Create (or resize) the global concurrency limit that GPU child runs take one slot of."""
    from prefect import get_client

    from fishtune.tasks.remote import GPU_LIMIT

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)
    typer.echo(f"global concurrency limit {GPU_LIMIT!r}: {slots} slot(s), one per GPU")


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
    app.command("deploy")(deploy_command)
    app.command("demo")(demo_command)
