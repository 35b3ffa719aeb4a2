"""The saved measurement: per layer, each option's exact bits and measured error, and the
layer's measured sensitivity; JSON, keyed by a hash of (model, data, options), written
atomically after every block so an interrupted measurement resumes.

    {"version": 1, "key": "...", "n_blocks": 30, "blocks_done": 30, "meta": {...},
     "options": {"w3g64a": {spec}, ...},
     "layers": {"model.layers.0.self_attn.q_proj": {"block": 0, "params": 331776,
                "bits": {"w3g64a": 1161216, ...}, "error": {"w3g64a": 0.0031, ...},
                "probe_error": 0.0012, "kl": 0.00021, "sensitivity": 0.17}, ...}}

`bits` are whole-layer storage bits as lowbit's checkpoint holds them (packed codes, scales,
zeros, g_idx); `error` the relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the calibration
inputs; `sensitivity` the measured increase of the model's output KL per unit of that error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.manifest import read_json
from lowbit.io.atomic import atomic_write_bytes
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

VERSION = 1


@dataclass
class Measurement:
    key: str
    n_blocks: int
    options: dict[str, QuantSpec]
    layers: dict[str, dict] = field(default_factory=dict)
    blocks_done: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.blocks_done >= self.n_blocks

    @property
    def params(self) -> int:
        return sum(int(v["params"]) for v in self.layers.values())

    def cost(self, name: str, option: str) -> float:
        """What the allocator minimises: the layer's predicted increase of the output KL."""
        layer = self.layers[name]
        return float(layer["sensitivity"]) * float(layer["error"][option])

    def to_json(self) -> dict:
        return {"version": VERSION, "key": self.key, "n_blocks": self.n_blocks, "blocks_done": self.blocks_done,
                "meta": self.meta, "options": {k: s.to_dict() for k, s in self.options.items()},
                "layers": self.layers}

    @classmethod
    def from_json(cls, d: dict, where: str = "measurement") -> "Measurement":
        try:
            if d.get("version") != VERSION:
                raise LowbitError(f"{where} has version {d.get('version')!r}; this lowbit reads version {VERSION} "
                                  "(delete it to measure again)")
            return cls(key=d["key"], n_blocks=int(d["n_blocks"]), blocks_done=int(d["blocks_done"]),
                       meta=dict(d.get("meta", {})),
                       options={k: QuantSpec.from_dict(s) for k, s in d["options"].items()},
                       layers=dict(d["layers"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LowbitError(f"{where} is not a lowbit measurement ({type(e).__name__}: {e}); "
                              "delete it to measure again") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=1, sort_keys=True).encode())


def load_measurement(path: str | Path) -> Measurement:
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"measurement {path} does not exist")
    data = read_json(path, "; delete it to measure again")
    return Measurement.from_json(data, f"measurement {path}")


def measurement_key(model, calib_ids: torch.Tensor, sens_ids: torch.Tensor, options, extra: str = "") -> str:
    """Hash of what a measurement depends on: the model (name, size and a weight's bytes), the
    calibration and sensitivity token ids, the candidate options and `extra` (method options...)."""
    h = hashlib.sha256()
    h.update(f"v{VERSION}|{extra}".encode())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(str(sum(p.numel() for p in model.parameters())).encode())
    first = next(p for p in model.parameters() if p.dim() == 2)
    h.update(first.detach().float().contiguous().numpy().tobytes()[: 1 << 20])
    h.update(calib_ids.numpy().tobytes())
    h.update(b"|")
    h.update(sens_ids.numpy().tobytes())
    h.update(json.dumps({o.name: o.spec.to_dict() for o in options}, sort_keys=True).encode())
    fixed = {o.name: o.bits_per_weight for o in options if getattr(o, "bits_per_weight", None) is not None}
    if fixed:  # options with a fixed storage (GGUF types); absent otherwise, so older keys stay valid
        h.update(json.dumps(fixed, sort_keys=True).encode())
    return h.hexdigest()


def default_measurement_path(key: str) -> Path:
    from lowbit.models.loader import cache_dir

    return cache_dir() / "measurements" / f"{key[:20]}.json"
