"""The ``watch`` flow: cheap change detection over each project's data, one event per changed project.

For each project saved on the store (``fishtune project create``) it lists the project's data
root (no reads: size + ETag / mtime per file) and compares every speaker folder's listing with
the one it saw last. Only a speaker whose listing changed is read and content-hashed, and only a
changed content counts: a ``touch`` emits nothing (the new listing is kept, so the speaker is not
re-hashed every tick). A project whose data changed gets ONE ``fishtune.project.data.changed``
event naming the changed speakers; the finetune-project deployment's trigger then retrains that
project from its saved spec on its whole data (unchanged files come from cache).

What a watch saw last is a Prefect Variable per project, ``fishtune-watch-<store hash>-<project>``:
it records what this Prefect server has been told, so it belongs with the server's own state. A
fresh (or lost) Prefect database starts from nothing: its first tick emits one event per project.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.types import MAX_VARIABLE_VALUE_LENGTH
from prefect.variables import Variable

from fish_speech_core.storage import Store, digest_listing, hash_tree, join, list_files, normalize_url, redact, redact_text
from fishtune import projects

EVENT = "fishtune.project.data.changed"
ALL = "*"  # the one group of a project whose per-speaker state does not fit in a Variable
SHORT = 16  # hex digits kept per digest: plenty to tell a change, small enough for ~100 speakers


def speaker_listings(data: str, speaker: str | None = None) -> dict[str, str]:
    """Speaker (top-level folder; only ``speaker`` when given) -> digest of its listing (path, size, ETag or mtime)."""
    per_speaker: dict[str, dict[str, str]] = defaultdict(dict)
    for rel, info in list_files(data).items():
        if "/" not in rel:
            continue  # files beside the speaker folders are not speaker data
        name, _ = rel.split("/", 1)
        if speaker is None or name == speaker:
            stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
            per_speaker[name][rel] = f"{info.get('size')}:{stamp}"
    return {name: digest_listing(files) for name, files in sorted(per_speaker.items())}


def _short(entries: dict[str, str]) -> str:
    return digest_listing(entries)[:SHORT]


def detect(data: str, speaker: str | None, seen: dict[str, Any] | None) -> tuple[dict[str, Any], list[str], str]:
    """``(state to keep, changed speakers, content fingerprint)`` of a project's data against ``seen``.

    The state maps each speaker to ``"<listing digest>:<content digest>"``; a speaker is hashed
    only when its listing changed. When that does not fit in a Variable, the whole project is one
    group (``*``): any listing change then re-hashes it all and names every speaker.
    """
    listings = speaker_listings(data, speaker)
    where = _short({"data": normalize_url(data), "speaker": speaker or ""})
    old = seen["groups"] if seen and seen.get("data") == where else {}  # another data root starts over
    groups = {ALL: sorted(listings)} if ALL in old else {name: [name] for name in listings}
    new, changed = {}, []
    for group, members in groups.items():
        listing = _short({name: listings[name] for name in members})
        old_listing, _, old_content = old.get(group, "").partition(":")
        content = old_content
        if listing != old_listing:
            contents = {name: _short({name: hash_tree(join(data, name))}) for name in members}
            content = _short(contents) if group == ALL else contents[group]
        new[group] = f"{listing}:{content}"
        if content != old_content:
            changed += members
    changed += [name for name in old if name not in new and name != ALL]  # a removed speaker is a change too
    fingerprint = _short({group: value.partition(":")[2] for group, value in new.items()})
    state = {"data": where, "groups": new}
    if ALL not in new and len(json.dumps(state)) >= MAX_VARIABLE_VALUE_LENGTH:
        # Too many speakers for one Variable: keep one group (its content digest over the speakers' own).
        whole = {name: new[name].partition(":")[2] for name in new}
        state = {"data": where, "groups": {ALL: f"{_short(listings)}:{_short(whole)}"}}
    return state, sorted(changed), fingerprint


def variable_name(storage_root: str, project: str) -> str:
    """Variable names allow lowercase letters, digits, '-' and '_': hash the store, keep the project name."""
    store = hashlib.sha256(Store(storage_root).root.encode()).hexdigest()[:12]
    return f"fishtune-watch-{store}-{projects.check_name(project)}"


@flow(name="watch")
def watch(storage: str, project: str | None = None) -> dict[str, list[str]]:
    """Emit fishtune.project.data.changed once for every project (or only ``project``) whose data changed."""
    logger = get_run_logger()
    root = Store(storage).root
    names = [project] if project else projects.list_projects(root)
    changed: dict[str, list[str]] = {}
    failed = []
    for name in names:
        try:
            spec = projects.load(root, name)
            key = variable_name(root, name)
            seen = Variable.get(key, default=None)
            state, speakers, fingerprint = detect(spec.data, spec.speaker, seen)
        except Exception as exc:  # noqa: BLE001 - one broken project must not stop watching the others
            if project:
                raise
            failed.append(f"{name}: {redact_text(exc)}")
            continue
        if speakers:
            emit_event(
                event=EVENT,
                resource={"prefect.resource.id": f"fishtune.project.{name}", "fishtune.project": name},
                payload={"project": name, "storage": redact(root), "data": redact(normalize_url(spec.data)),
                         "speakers": speakers, "fingerprint": fingerprint},
            )
            changed[name] = speakers
        if state != seen:  # after the emit: a crash in between re-emits next time rather than losing the change
            Variable.set(key, state, overwrite=True)
    logger.info("projects with changed data: %s", "; ".join(f"{n} ({', '.join(s)})" for n, s in changed.items()) or "none")
    if failed:
        raise RuntimeError(f"could not check {len(failed)} project(s): " + "; ".join(failed))
    return changed
