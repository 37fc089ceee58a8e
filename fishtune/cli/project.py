"""``fishtune project``: saved finetune specs on the store (create, list, show, edit), their runs and watch schedules.

A project's spec is ``<storage>/projects/<name>.json`` (fishtune/projects.py): creating, showing
and editing it needs only the store, no Prefect server. ``run`` runs it here like ``fishtune
finetune``; ``schedule`` puts a watch schedule for it on the server's ``watch`` deployment.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from datetime import timedelta

import typer
from rich.console import Console
from rich.markup import escape

from fish_speech_core.storage import DEFAULT_ROOT, CredentialsInURLError, Store
from fishtune import projects
from fishtune.flows.config import FinetuneConfig

console = Console(stderr=True)
project_app = typer.Typer(help="Saved finetune projects: a spec on the store that every run (and the data-changed trigger) uses.",
                  no_args_is_help=True)

STORAGE = typer.Option(DEFAULT_ROOT, "--storage", envvar="FISHTUNE_STORAGE",
                       help="Store root holding the projects (<storage>/projects/NAME.json) and their models (FISHTUNE_STORAGE).")
SET = typer.Option([], "--set", metavar="FIELD=VALUE",
                   help="A finetune setting (FinetuneConfig field, nested as normalize.loudness=-20; FIELD= clears it). Repeatable.")
WATCH = "watch/watch"
_F = FinetuneConfig.model_fields
_EVERY = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


@contextmanager
def _one_line():
    """Project and URL errors become one line and exit status 2."""
    try:
        yield
    except (projects.ProjectError, CredentialsInURLError) as exc:
        _fail(str(exc))


def create_command(
    name: str = typer.Argument(..., help="Project name: lowercase letters, digits and dashes."),
    data: str = typer.Option(..., "--data", help=_F["data"].description),
    base: str = typer.Option(..., "--base", help=_F["base"].description),
    codec: str = typer.Option(..., "--codec", help=_F["codec"].description),
    storage: str = STORAGE,
    settings: list[str] = SET,
) -> None:
    """Save a new project spec (validated) on the store."""
    with _one_line():
        config = projects.create(storage, name, {**projects.parse_settings(settings), "data": data, "base": base, "codec": codec})
        typer.echo(projects.spec_url(config.storage, name))


def list_command(storage: str = STORAGE) -> None:
    """The projects on the store, with their data (or why a spec cannot be read)."""
    with _one_line():
        for name in projects.list_projects(storage):
            try:
                typer.echo(f"{name}\t{projects.load(storage, name).data}")
            except projects.ProjectError as exc:
                typer.echo(f"{name}\tunreadable: {exc}")


def show_command(name: str = typer.Argument(...), storage: str = STORAGE) -> None:
    """Print a project's spec (JSON)."""
    with _one_line():
        typer.echo(json.dumps(projects.load(storage, name).model_dump(mode="json"), indent=2))


def edit_command(name: str = typer.Argument(...), settings: list[str] = SET, storage: str = STORAGE) -> None:
    """Change fields of a project's spec (re-validated before it is saved)."""
    with _one_line():
        if not settings:
            raise projects.ProjectError("nothing to change: give --set FIELD=VALUE")
        projects.edit(storage, name, projects.parse_settings(settings))
        typer.echo(projects.spec_url(storage, name))


def run_command(name: str = typer.Argument(...), settings: list[str] = SET, storage: str = STORAGE) -> None:
    """Run the finetune-project flow here: the saved spec, with --set values for this run only."""
    from fishtune.cli.flows import _prefect_defaults, _run_and_print

    with _one_line():
        changes = projects.parse_settings(settings)
        config = projects.with_settings(projects.load(storage, name), changes)  # errors before Prefect starts
        overrides = projects.overrides(changes)
    _prefect_defaults()
    from fishtune.flows.project import finetune_project

    _run_and_print(config, console, lambda: finetune_project(name, config.storage, overrides, return_state=True))


def schedule_slug(storage: str, name: str) -> str:
    """One schedule per project and store on the watch deployment (a slug is unique per deployment)."""
    return f"project-{name}-{hashlib.sha256(Store(storage).root.encode()).hexdigest()[:8]}"


def _interval(every: str) -> timedelta:
    match = _EVERY.match(every.strip())
    interval = timedelta(**{_UNITS[match[2]]: int(match[1])}) if match else None
    if interval is None or interval < timedelta(minutes=1):
        _fail(f"--every {every!r}: expected a number and s, m, h or d of at least one minute (e.g. 5m)")
    return interval


def schedule_command(
    name: str = typer.Argument(...),
    every: str | None = typer.Option(None, "--every", help="Watch this project every N s/m/h/d (e.g. 5m)."),
    cron: str | None = typer.Option(None, "--cron", help="Watch this project on a cron schedule (e.g. '*/5 * * * *')."),
    timezone: str = typer.Option("UTC", "--timezone", help="Time zone of --cron."),
    off: bool = typer.Option(False, "--off", help="Remove this project's own schedule."),
    storage: str = STORAGE,
) -> None:
    """Give a project its own schedule on the watch deployment (replacing its previous one); needs PREFECT_API_URL."""
    from pydantic import ValidationError

    with _one_line():
        if sum((every is not None, cron is not None, off)) != 1:
            raise projects.ProjectError("give one of --every, --cron or --off")
        config = projects.load(storage, name)
    interval = _interval(every) if every is not None else None
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail("schedules live on the Prefect server: start one (prefect server start) and set PREFECT_API_URL")
    schedule = IntervalSchedule(interval=interval) if interval else None
    if cron is not None:
        try:
            schedule = CronSchedule(cron=cron, timezone=timezone)
        except ValidationError as exc:
            _fail(f"--cron {cron!r}: {projects.problems(exc)}")
    replaced = set_schedule(config.storage, name, schedule)
    if off:
        typer.echo(f"removed the watch schedule of project {name}" if replaced else f"project {name} had no schedule of its own")
    else:
        typer.echo(f"watch runs {'every ' + every if every else 'on ' + cron} for project {name}"
                   + (" (replaced its previous schedule)" if replaced else ""))


def set_schedule(storage: str, name: str, schedule) -> int:
    """Put ``schedule`` (None: none) for project ``name`` on the watch deployment; how many it replaced."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.exceptions import ObjectNotFound

    slug = schedule_slug(storage, name)
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(WATCH)
        except ObjectNotFound:
            _fail(f"no {WATCH} deployment on the Prefect server: run fishtune deploy first")
        old = [s for s in client.read_deployment_schedules(deployment.id) if s.slug == slug]
        for s in old:
            client.delete_deployment_schedule(deployment.id, s.id)
        if schedule is not None:
            client.create_deployment_schedules(deployment.id, [DeploymentScheduleCreate(
                schedule=schedule, active=True, slug=slug, parameters={"storage": storage, "project": name})])
    return len(old)


def register(app: typer.Typer) -> None:
    for command, fn in (("create", create_command), ("list", list_command), ("show", show_command),
                        ("edit", edit_command), ("run", run_command), ("schedule", schedule_command)):
        project_app.command(command)(fn)
    app.add_typer(project_app, name="project")
