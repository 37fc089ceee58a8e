"""The ``watch`` flow: cheap change detection over a data prefix, one event per changed speaker.

It lists the prefix (no reads: size + ETag / mtime per file), fingerprints each speaker's
listing and compares it with the Prefect Variable that holds the last one. Only a change emits
``fishtune.speaker.data.landed``, which the finetune deployment's trigger turns into a run.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.variables import Variable

from fish_speech_core import storage

EVENT = "fishtune.speaker.data.landed"


def fingerprints(data: str) -> dict[str, str]:
    """Speaker (top-level folder) -> sha256 of its listing (path, size, ETag or mtime)."""
    per_speaker: dict[str, dict[str, str]] = defaultdict(dict)
    for rel, info in storage.list_files(data).items():
        if "/" not in rel:
            continue  # files beside the speaker folders are not speaker data
        speaker, _ = rel.split("/", 1)
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        per_speaker[speaker][rel] = f"{info.get('size')}:{stamp}"
    return {speaker: storage.digest_listing(files) for speaker, files in sorted(per_speaker.items())}


def variable_name(data: str, speaker: str) -> str:
    """Variable names allow lowercase letters, digits, '-' and '_': hash the prefix, slug the speaker."""
    prefix = hashlib.sha256(storage.normalize_url(data).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9_-]", "-", speaker.lower())[:100]
    return f"fishtune-fp-{prefix}-{slug}-{hashlib.sha256(speaker.encode()).hexdigest()[:6]}"


@flow(name="watch")
def watch(data: str, project: str = "demo") -> list[str]:
    """Emit fishtune.speaker.data.landed for every speaker whose files changed since the last run."""
    logger = get_run_logger()
    changed = []
    for speaker, fingerprint in fingerprints(data).items():
        name = variable_name(data, speaker)
        if Variable.get(name, default=None) == fingerprint:
            continue
        emit_event(
            event=EVENT,
            resource={"prefect.resource.id": f"fishtune.speaker.{speaker}", "fishtune.speaker": speaker},
            payload={"data": storage.redact(storage.normalize_url(data)), "speaker": speaker, "project": project,
                     "fingerprint": fingerprint},
        )
        # set after the emit: a crash in between re-emits next time rather than losing the change
        Variable.set(name, fingerprint, overwrite=True)
        changed.append(speaker)
    logger.info("changed speakers: %s", ", ".join(changed) or "none")
    return changed
