"""Reading a folder's JSON manifest: one clear error for a missing file, bad JSON or another format."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.errors import LowbitError


def read_manifest(folder: str | Path, filename: str, fmt: str, what: str) -> dict:
    """The JSON object in `folder/filename` whose "format" is `fmt`; `what` names the folder's kind
    in the errors (e.g. "lowbit checkpoint")."""
    folder = Path(folder)
    file = folder / filename
    if not file.is_file():
        raise LowbitError(f"{folder} is not a {what} (no {filename})")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as e:
        raise LowbitError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise LowbitError(f"{file} is not a {what}'s manifest")
    return manifest
