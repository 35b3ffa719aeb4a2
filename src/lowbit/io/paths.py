"""Telling a local path from a Hugging Face hub name before any network access."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".jsonl", ".txt", ".rst", ".md",
                 ".yaml", ".yml")


def hub_shaped(source: str) -> bool:
    """`owner/name` that cannot be a local path with a typo: exactly one slash, no leading `.`,
    `/` or `~`, no file suffix, and no local folder named like its first part."""
    if not _HUB_NAME.match(source) or Path(source).suffix.lower() in FILE_SUFFIXES:
        return False
    return not Path(source.split("/", 1)[0]).exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (seconds, not the ~30 s of retries a
    download attempt spends offline). True behind a proxy, where a direct connection proves nothing."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
