"""Links a browser can open for objects on the store.

A browser opens neither ``s3://`` nor (from a web UI) ``file://`` URLs: an s3 object gets a
pre-signed https URL, signed locally with the environment's credentials (it carries the access
key id and a signature, never the secret, and expires); a local file gets no link at all, and
callers show its path as text instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from fish_speech_core.storage import filesystem, is_local

PRESIGNED_SECONDS = 7 * 24 * 3600  # S3's upper limit for SigV4 pre-signed URLs


def browser_link(url: str, expires_s: int = PRESIGNED_SECONDS) -> str | None:
    """An https URL for ``url`` (already https: itself; s3: pre-signed), or None (local, or signing failed)."""
    if url.startswith(("http://", "https://")):
        return url
    if is_local(url) or not _has_credentials():
        return None
    try:
        fs, path = filesystem(url)  # refuses a URL that carries credentials: no link for it either
        return fs.sign(path, expiration=expires_s)
    except Exception:  # noqa: BLE001 - no credentials or a filesystem without signing: no link, the text stays
        return None


def _has_credentials() -> bool:
    """Credentials signing can use without a network call (environment, web identity, profile).

    Without them botocore would ask the instance metadata service, which off a cloud host only
    times out; a report must not wait for that.
    """
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_PROFILE"):
        return True
    return Path(env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser().is_file()
