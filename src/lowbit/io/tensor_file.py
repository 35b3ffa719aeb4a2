"""A deterministic, streaming safetensors writer.

`safetensors.torch.save_file` first copies every tensor into a Python bytes object (all of them at
once) and writes its metadata in random order. This writer streams each tensor's own bytes into
the file (no copies) under a header with sorted keys, so the same tensors give the same bytes.
Files are read back with the safetensors library.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (CPU) to `path` in the safetensors format, keys and metadata sorted."""
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = tensors[name].detach()
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


class SafetensorsReader:
    """Reads single tensors of a safetensors file with plain reads into fresh memory: no file
    mapping, so a loaded model is held once (a mapped file's touched pages would stay resident
    beside the copies made from them). The header was validated by `models.validate` first."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.base = 8 + n
        header.pop("__metadata__", None)
        self.header = header
        self.dtypes = {v: k for k, v in DTYPES.items()}

    def keys(self):
        return self.header.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        with open(self.path, "rb") as f:
            f.seek(self.base + start)
            f.readinto(buf)
        flat = torch.frombuffer(buf, dtype=self.dtypes[info["dtype"]]) if buf else torch.empty(
            0, dtype=self.dtypes[info["dtype"]])
        return flat.reshape(info["shape"])
