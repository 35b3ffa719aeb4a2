"""The streaming safetensors writer: what the safetensors library reads back, byte-deterministic."""

import hashlib

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowbit.io.tensor_file import write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "b.view": base[1:4, ::2],  # a strided view: only its own elements are written
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c.int8": torch.randint(-128, 127, (4, 7), dtype=torch.int8, generator=g),
        "d.f16": torch.randn(2, 3, generator=g).half(),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
        "g.long": torch.arange(5),
        "h.fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }


def test_round_trip_and_same_bytes(tmp_path):
    t = _tensors()
    write_safetensors(tmp_path / "a.safetensors", t, {"z": "1", "a": "2"})
    write_safetensors(tmp_path / "b.safetensors", dict(reversed(list(t.items()))), {"a": "2", "z": "1"})
    digests = {hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in ("a.safetensors", "b.safetensors")}
    assert len(digests) == 1
    back = load_file(tmp_path / "a.safetensors")
    assert sorted(back) == sorted(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].view(torch.uint8), v.contiguous().view(torch.uint8)) if v.dtype == torch.float8_e4m3fn \
            else torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"a": "2", "z": "1"}
