"""Resumable calibration: after each finished block, that block's quantized weights and the next
block's inputs are written atomically; an interrupted run continues from the last finished block.

Layout of a state folder: `block_NNNN.pt` per finished block (its layers only, written once) and
`calibration_state.pt` (the last finished block, the run's fingerprint, the next block's inputs,
every layer's error so far). The state file is written last and is the commit point: a block
file beyond the block it names (an interruption between the two writes) is ignored and later
overwritten.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_file

log = logging.getLogger(__name__)
STATE = "calibration_state.pt"


def _block_file(state_dir: Path, block: int) -> Path:
    return state_dir / f"block_{block:04d}.pt"


def _save(payload: dict, path: Path) -> None:
    with atomic_file(path) as f:
        torch.save(payload, f)


def _load(path: Path, fingerprint: str) -> dict:
    try:
        payload = torch.load(path, weights_only=False)
    except Exception as e:
        raise LowbitError(f"{path} is not a readable calibration state ({e}); delete it to start over") from None
    if payload.get("fingerprint") != fingerprint:
        raise LowbitError(f"{path} belongs to a different model, recipe or calibration set; "
                          "delete it or pick another state folder")
    return payload


def save_state(state_dir: str | Path, block: int, fingerprint: str, block_qweights: dict[str, QuantizedWeight],
               hidden: list[torch.Tensor], layer_errors: dict | None) -> None:
    """Record that `block` is finished: its layers (`block_qweights`, this block's only) and the
    next block's inputs `hidden`."""
    state_dir = Path(state_dir)
    layers = {n: {"codes": q.codes, "scale": q.scale, "zero": q.zero, "g_idx": q.g_idx, "spec": q.spec.to_dict()}
              for n, q in block_qweights.items()}
    _save({"block": block, "fingerprint": fingerprint, "qweights": layers}, _block_file(state_dir, block))
    _save({"block": block, "fingerprint": fingerprint, "hidden": hidden,
                  "layer_errors": dict(layer_errors or {})}, state_dir / STATE)


def load_state(state_dir: str | Path, fingerprint: str) -> dict | None:
    """{block, hidden, layer_errors, qweights of blocks 0..block}, or None when there is no state;
    refuses a state from a different run or with a block file missing."""
    from lowbit.spec import QuantSpec

    state_dir = Path(state_dir)
    path = state_dir / STATE
    if not path.is_file():
        return None
    payload = _load(path, fingerprint)
    qweights = {}
    for block in range(payload["block"] + 1):
        part = _block_file(state_dir, block)
        if not part.is_file():
            raise LowbitError(f"{path} names block {payload['block']} as finished but {part.name} is missing; "
                              "delete the state folder to start over")
        qweights.update({n: QuantizedWeight(d["codes"], d["scale"], d["zero"], QuantSpec.from_dict(d["spec"]), d["g_idx"])
                         for n, d in _load(part, fingerprint)["qweights"].items()})
    payload["qweights"] = qweights
    log.info("resuming calibration after block %d from %s", payload["block"], state_dir)
    return payload


def fingerprint(recipe, calib_ids: torch.Tensor, model, extra: str = "") -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(extra.encode())
    h.update(repr(recipe).encode())
    h.update(calib_ids.numpy().tobytes())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(str(sum(p.numel() for p in model.parameters())).encode())
    return h.hexdigest()
