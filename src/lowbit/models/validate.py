"""Up-front checks of model files so a bad file gets one clear error, not a traceback."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lowbit.errors import LowbitError


def check_safetensors(path: Path) -> None:
    """Header parses and every tensor's bytes lie inside the file (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path} is not a valid safetensors file ({e}); re-download or re-export it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise LowbitError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}; "
            "re-download or re-export it"
        )


def check_gguf(path: Path) -> None:
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted errors on corrupt input
        raise LowbitError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def check_hf_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} has no config.json; a model folder needs config.json and *.safetensors")
    try:
        json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise LowbitError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files and not list(path.glob("*.bin")):
        raise LowbitError(f"{path} holds no *.safetensors weights")
    for f in files:
        check_safetensors(f)
