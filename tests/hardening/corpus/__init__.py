"""A generated corpus of hostile inputs, run through the real ``fishtune`` command line.

Each :class:`Case` builds its inputs in an empty folder and says what a good outcome is: the exit
status, text the one-line error must contain (the file's name, the reason), and what must never
happen (a traceback, a hang, a secret in the output, an input file changed, a path outside the
root read, bad data accepted). :func:`run_case` runs it in a subprocess and classifies the outcome.
``tests/hardening/test_corpus.py`` asserts every case is handled; ``bench/hostile.py`` prints the
table of outcomes. Family modules (``paths``, ``data``, ``later``, ``train``) each define ``CASES``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("handled", "traceback", "hang", "unclear", "silent-accept", "escape", "leak", "input-written")
FAMILIES = ("paths", "data", "later", "train")


@dataclass
class Run:
    """What to run (``fishtune`` arguments) and how to judge it."""

    args: list[str]
    exit_codes: tuple[int, ...] = (1,)  # acceptable exit statuses
    output_has: tuple[str, ...] = ()  # substrings the combined stdout+stderr must contain
    output_lacks: tuple[str, ...] = ()  # secrets: any of them in the output is a leak
    unchanged: tuple[Path, ...] = ()  # input files/folders whose bytes must stay the same
    # Extra judgement after the run: returns an outcome label ("silent-accept", "escape", ...) or None.
    check: Callable[[subprocess.CompletedProcess], str | None] | None = None
    timeout: float = 180.0
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    build: Callable[[Path], Run]  # makes the inputs under the given empty folder


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str
    seconds: float


def fingerprint(path: Path) -> str:
    """Content + names of a file or a tree (symlinks by target, not followed)."""
    digest = hashlib.sha256()
    paths = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
    for item in paths:
        digest.update(os.fsencode(item))
        if item.is_symlink():
            digest.update(b"->" + os.fsencode(os.readlink(item)))
        elif item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def run_case(case: Case, workdir: Path) -> Result:
    """Build the case under ``workdir``, run it, and classify what happened."""
    started = time.monotonic()
    run = case.build(workdir)
    before = {p: fingerprint(p) for p in run.unchanged}
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", **run.env}
    env.pop("FISHTUNE_DEBUG", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fishtune", *run.args], cwd=workdir, env=env, capture_output=True, text=True,
            errors="replace", timeout=run.timeout, input=run.stdin if run.stdin is not None else "",
        )
    except subprocess.TimeoutExpired:
        return Result(case, "hang", f"no exit within {run.timeout:.0f} s", time.monotonic() - started)
    text = done.stdout + done.stderr
    seconds = time.monotonic() - started

    def result(outcome: str, detail: str) -> Result:
        return Result(case, outcome, detail, seconds)

    if "Traceback (most recent call last)" in text:
        return result("traceback", text.strip().splitlines()[-1][:300])
    for secret in run.output_lacks:
        if secret in text:
            return result("leak", f"output contains {secret!r}")
    changed = [str(p) for p, fp in before.items() if fingerprint(p) != fp]
    if changed:
        return result("input-written", f"changed: {changed}")
    if run.check is not None:
        label = run.check(done)
        if label:
            return result(label, f"exit {done.returncode}: {_last_lines(text)}")
    if done.returncode not in run.exit_codes:
        return result("unclear", f"exit {done.returncode} (expected {run.exit_codes}): {_last_lines(text)}")
    missing = [s for s in run.output_has if s not in text]
    if missing:
        return result("unclear", f"output lacks {missing}: {_last_lines(text)}")
    return result("handled", _last_lines(text))


def _last_lines(text: str, n: int = 2) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[:400]


def all_cases(families: tuple[str, ...] = FAMILIES) -> list[Case]:
    cases: list[Case] = []
    for family in families:
        try:
            module = importlib.import_module(f"tests.hardening.corpus.{family}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tests.hardening.corpus.{family}":
                raise
            continue
        cases.extend(module.CASES)
    return cases
