"""The versioned models of a project on the store: ``<root>/models/<project>/<version>/``.

Versions are UTC timestamps + key, so they sort by creation; each holds ``lineage.json`` naming
the adapter it was merged from and the base's sha256.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import PurePosixPath

from fish_speech_core import storage
from fish_speech_core.storage import Store

MODELS = "models"


class WarmStartError(ValueError):
    """warm_start asked for, but no usable earlier LoRA of this project."""


def new_version(key: str) -> str:
    """UTC time + key: sorts by creation and never collides with an earlier model."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + key[:12]


def versions(store: Store, project: str) -> list[str]:
    """The project's complete model versions, oldest first."""
    fs, root = storage.filesystem(store.url(MODELS, project))
    try:
        markers = sorted(fs.glob(root.rstrip("/") + f"/*/{storage.MARKER}"))
    except FileNotFoundError:
        return []
    return [PurePosixPath(m).parent.name for m in markers]


def latest_lora(store: Store, project: str, base: str) -> str:
    """The adapter URL of this project's newest merged model; its base must be ``base``.

    Raises:
        WarmStartError: no earlier model, or it was trained on a different base.
    """
    found = versions(store, project)
    if not found:
        raise WarmStartError(f"warm_start: project {project!r} has no earlier merged model in {store}; "
                             f"run once without warm_start first")
    newest = found[-1]
    lineage = json.loads(store.read_bytes(f"{MODELS}/{project}/{newest}/lineage.json"))
    base_sha = storage.hash_any(storage.join(storage.normalize_url(base), "model.pth"))
    if lineage.get("base_sha256") and lineage["base_sha256"] != base_sha:
        raise WarmStartError(
            f"warm_start: the latest LoRA of {project!r} ({newest}) was trained on base model.pth sha256 "
            f"{lineage['base_sha256'][:12]}…, this base is {base_sha[:12]}…; use the same base or run without warm_start"
        )
    return lineage["adapter"]
