"""Reading JSON files and a folder's JSON manifest: one clear error for a missing file, bad JSON or another format."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.errors import LowbitError


def read_json(file: str | Path, fix: str = ""):
    """The parsed JSON of `file`; a file that cannot be read or parsed is one LowbitError naming it
    (`fix` is appended: what the user can do about it)."""
    try:
        return json.loads(Path(file).read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{file} is not readable JSON ({e}){fix}") from None


def read_manifest(folder: str | Path, filename: str, fmt: str, what: str) -> dict:
    """The JSON object in `folder/filename` whose "format" is `fmt`; `what` names the folder's kind
    in the errors (e.g. "lowbit checkpoint")."""
    folder = Path(folder)
    file = folder / filename
    if not file.is_file():
        raise LowbitError(f"{folder} is not a {what} (no {filename})")
    manifest = read_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise LowbitError(f"{file} is not a {what}'s manifest")
    return manifest
