"""Orchestrated commands: ``fishtune finetune`` (runs the Prefect flow) and ``fishtune deploy``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import typer

from fishtune.flows.config import AudioFormat, FinetuneConfig, NormalizeOptions, Preset, Sampling

_F = FinetuneConfig.model_fields
_N = NormalizeOptions.model_fields
# Package data, so the demo and deploy work the same from a wheel as from a checkout.
DEMO_DATA = Path(str(files("fishtune.examples") / "demo-data"))
PREFECT_FILE = Path(str(files("fishtune.deployments") / "prefect.yaml"))
FLAGS = {  # pydantic field path -> CLI flag, so validation errors name the flag to fix
    "project": "--project", "data": "--data", "speaker": "--speaker", "storage": "--storage",
    "work_dir": "--work-dir", "max_seconds": "--max-seconds", "text_extension": "--text-extension",
    "normalize.loudness": "--loudness", "normalize.peak": "--peak", "normalize.format": "--format",
    "num_workers": "--num-workers", "base": "--base", "codec": "--codec", "preset": "--preset",
    "max_steps": "--max-steps", "max_length": "--max-length", "sampling": "--sampling", "seed": "--seed", "progress_every": "--progress-every", "evaluate": "--evaluate",
    "preview_sentences_per_speaker": "--preview-sentences",
    "preview_max_new_tokens": "--preview-max-tokens", "merge_step": "--merge-step", "asr": "--asr", "warm_start": "--warm-start", "gpu_pool": "--gpu-pool",
}


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


def build_config(**values) -> FinetuneConfig:
    """The flow's config from CLI values; every invalid value is reported at once, by flag."""
    from pydantic import ValidationError

    normalize = {k: values.pop(k) for k in ("loudness", "peak", "format")}
    try:
        return FinetuneConfig(**values, normalize=normalize)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            path = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{FLAGS.get(path, path)}: {message}" if path else message)
        raise typer.BadParameter("; ".join(problems)) from None


def finetune_command(
    data: str = typer.Option(..., "--data", help=_F["data"].description),
    project: str = typer.Option(_F["project"].default, "--project", help=_F["project"].description),
    speaker: str | None = typer.Option(None, "--speaker", help=_F["speaker"].description),
    storage: str = typer.Option(_F["storage"].default, "--storage", help=_F["storage"].description),
    work_dir: str | None = typer.Option(None, "--work-dir", help=_F["work_dir"].description),
    base: str | None = typer.Option(None, "--base", help=_F["base"].description),
    codec: str | None = typer.Option(None, "--codec", help=_F["codec"].description),
    preset: Preset = typer.Option(_F["preset"].default.value, "--preset", help=_F["preset"].description),
    max_steps: int = typer.Option(_F["max_steps"].default, "--max-steps", help=_F["max_steps"].description),
    max_length: int | None = typer.Option(None, "--max-length", help=_F["max_length"].description),
    sampling: Sampling = typer.Option(_F["sampling"].default.value, "--sampling", help=_F["sampling"].description),
    seed: int = typer.Option(_F["seed"].default, "--seed", help=_F["seed"].description),
    progress_every: int = typer.Option(_F["progress_every"].default, "--progress-every", help=_F["progress_every"].description),
    evaluate: bool = typer.Option(False, "--evaluate/--no-evaluate", help=_F["evaluate"].description),
    preview_sentences: int = typer.Option(_F["preview_sentences_per_speaker"].default, "--preview-sentences", help=_F["preview_sentences_per_speaker"].description),
    preview_max_tokens: int = typer.Option(_F["preview_max_new_tokens"].default, "--preview-max-tokens", help=_F["preview_max_new_tokens"].description),
    merge_step: int | None = typer.Option(None, "--merge-step", help=_F["merge_step"].description),
    asr: str | None = typer.Option(None, "--asr", help=_F["asr"].description),
    warm_start: bool = typer.Option(False, "--warm-start/--from-base", help=_F["warm_start"].description),
    gpu_pool: str | None = typer.Option(None, "--gpu-pool", help=_F["gpu_pool"].description),
    loudness: float = typer.Option(_N["loudness"].default, "--loudness", help=_N["loudness"].description),
    peak: float = typer.Option(_N["peak"].default, "--peak", help=_N["peak"].description),
    format: AudioFormat = typer.Option(_N["format"].default.value, "--format", help=_N["format"].description),
    max_seconds: float = typer.Option(_F["max_seconds"].default, "--max-seconds", help=_F["max_seconds"].description),
    text_extension: str = typer.Option(_F["text_extension"].default, "--text-extension", help=_F["text_extension"].description),
    num_workers: int = typer.Option(_F["num_workers"].default, "--num-workers", help=_F["num_workers"].description),
) -> None:
    """Run the finetune flow (validate -> normalize -> ...) with caching; prints the report location."""
    from rich.console import Console

    console = Console(stderr=True)
    config = build_config(
        data=data, project=project, speaker=speaker, storage=storage, work_dir=work_dir, base=base, codec=codec,
        preset=preset, max_steps=max_steps, max_length=max_length, sampling=sampling, seed=seed, progress_every=progress_every, evaluate=evaluate,
        preview_sentences_per_speaker=preview_sentences, preview_max_new_tokens=preview_max_tokens, merge_step=merge_step, asr=asr, warm_start=warm_start, gpu_pool=gpu_pool, loudness=loudness,
        peak=peak, format=format, max_seconds=max_seconds, text_extension=text_extension, num_workers=num_workers,
    )
    _prefect_defaults()
    _run_and_print(config, console)


def _run_and_print(config: FinetuneConfig, console) -> dict:
    """Run the flow, print the stage table and where the report / merged model are; exit 1 on failure."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from fish_speech_core.storage import redact, redact_text
    from fishtune.flows.finetune import finetune
    from fishtune.flows.report import cache_label

    try:
        state = finetune(config, return_state=True)
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
    table = Table(title=f"finetune {config.project}: run {escape(str(result['run_id']))}")
    for column in ("stage", "cache", "seconds", "artifact"):
        table.add_column(column)
    for stage in result["stages"]:
        table.add_row(Text(stage["stage"]), cache_label(stage["stage"], stage["cached"], stage.get("summary") or {}),
                      f"{stage['seconds']:.2f}", Text(redact(stage["url"])))
    console.print(table)
    if result.get("recommended_checkpoint"):
        console.print(f"Recommended checkpoint: {redact(result['recommended_checkpoint'])}", soft_wrap=True, markup=False)
    if result.get("merged_model"):
        console.print(f"Merged model: {redact(result['merged_model'])}", soft_wrap=True, markup=False)
    console.print(f"Report:   {redact(result['report'])}", soft_wrap=True, markup=False)
    console.print(f"Manifest: {redact(result['manifest'])}", soft_wrap=True, markup=False)
    return result


def _state_exception(state) -> BaseException | None:
    try:
        state.result(raise_on_failure=True)
    except BaseException as err:  # noqa: BLE001 - we only look at it
        return err
    return None


def demo_command(
    output: Path = typer.Option(Path("demo-output"), "--output", help="Folder for everything the demo makes: tiny models, the store (artifacts, merged model, run report) and Prefect's home."),
    max_steps: int = typer.Option(30, "--max-steps", min=1, max=10_000, help="Training steps (the tiny preset validates and checkpoints every 10)."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Render and score previews of the base and each checkpoint (random models: the clips are noise or empty)."),
    preview_sentences: int = typer.Option(1, "--preview-sentences", min=1, max=20, help="Held-out sentences rendered per speaker and checkpoint with --evaluate (the finetune default is 3; 1 keeps the demo short)."),
    data: Path = typer.Option(DEMO_DATA, "--data", exists=True, file_okay=False, help="Dataset folder (one folder per speaker of audio + .lab transcripts)."),
) -> None:
    """Run the whole finetune flow on the demo data with a tiny random base model and codec (no download).

    Ephemeral Prefect (a temporary local server), a local store under --output; a few minutes on 2 CPU cores.
    The models are random, so the merged model speaks nonsense: the demo shows the pipeline, not a voice.
    """
    from rich.console import Console

    console = Console(stderr=True)
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    # Before Prefect is imported: its own home under --output (no user profile, no server URL, so
    # ephemeral mode), no telemetry, and a startup timeout that holds on a loaded 2-core machine.
    os.environ["PREFECT_HOME"] = str(output / "prefect-home")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    _prefect_defaults()

    base, codec = output / "models" / "base-tiny", output / "models" / "codec-tiny.pth"
    with console.status("making a tiny random base model and codec (seeded: the same bytes every time)"):
        if not (base / "model.pth").is_file():
            from fish_speech_core.lm.config import PRESETS
            from fish_speech_core.lm.init_base import init_base

            init_base(base, PRESETS["tiny"], seed=0)
        if not codec.is_file():
            from fish_speech_core.codec import init_codec, save_codec
            from fish_speech_core.codec.config import FireflyConfig

            save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)
    config = build_config(
        data=str(data), project="demo", storage=str(output / "store"), base=str(base), codec=str(codec),
        preset=Preset.tiny, max_steps=max_steps, progress_every=5, evaluate=evaluate, loudness=-23.0, peak=-1.0, format=AudioFormat.keep,
        preview_sentences_per_speaker=preview_sentences,
        preview_max_new_tokens=64,  # random models rarely stop on their own: keep their previews short
    )
    console.print(f"demo: finetune flow on {data} -> {output / 'store'} ({max_steps} training steps)", markup=False)
    _run_and_print(config, console)


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


def deploy_command(
    data: str = typer.Option(..., "--data", help="Data prefix the watch flow scans and finetune reads (FISHTUNE_DATA)."),
    storage: str = typer.Option(..., "--storage", help="Artifact store root for the deployed runs (FISHTUNE_STORAGE); use a location every worker can reach."),
    prefect_file: Path = typer.Option(PREFECT_FILE, "--prefect-file", exists=True, dir_okay=False, help="The deployments file (default: the one installed with fishtune)."),
    create_pools: bool = typer.Option(True, "--create-pools/--no-create-pools", help="Create the cpu and cuda process work pools when missing."),
    gpus: int = typer.Option(1, "--gpus", min=1, max=4096, help="GPUs the cuda pool's workers have in all: slots of the global `gpu` concurrency limit every GPU child run takes."),
) -> None:
    """Create the work pools, the `gpu` concurrency limit and the deployments (finetune, its GPU stages, watch) on the Prefect server.

    Entry points are module paths (fishtune.flows.finetune:finetune): a worker needs fishtune
    installed (the Docker images, or the same lock), not a copy of this repository.
    """
    from fish_speech_core.storage import CredentialsInURLError, refuse_credentials

    for flag, url in (("--data", data), ("--storage", storage)):
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
    env = {**os.environ, "FISHTUNE_DATA": data, "FISHTUNE_STORAGE": storage}
    if create_pools:
        for pool in ("cpu", "cuda"):
            exists = subprocess.run([*prefect, "work-pool", "inspect", pool], env=env, capture_output=True).returncode == 0
            if not exists:
                subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process"], env=env, check=True)
    _gpu_limit(gpus)
    ready, missing = _deployable(prefect_file)
    for name in missing:
        typer.echo(f"skipped deployment {name!r}: its flow module is not installed here", err=True)
    names = [arg for name in ready for arg in ("--name", name)]
    done = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--prefect-file", str(prefect_file.resolve()), *names], env=env,
        cwd=prefect_file.resolve().parent,
    )
    if done.returncode:
        typer.echo("prefect deploy failed (see above)", err=True)
        raise typer.Exit(done.returncode)


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
