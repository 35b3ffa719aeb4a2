"""Resumable calibration: after each finished block, the quantized weights so far and the next
block's inputs are written atomically; an interrupted run continues from the last finished block."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)
STATE = "calibration_state.pt"


def save_state(state_dir: str | Path, block: int, fingerprint: str, qweights: dict[str, QuantizedWeight],
               hidden: list[torch.Tensor], layer_errors: dict | None) -> None:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "block": block,
        "fingerprint": fingerprint,
        "qweights": {n: {"codes": q.codes, "scale": q.scale, "zero": q.zero, "g_idx": q.g_idx,
                         "spec": q.spec.to_dict()} for n, q in qweights.items()},
        "hidden": hidden,
        "layer_errors": dict(layer_errors or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE}.tmp-", dir=state_dir)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, state_dir / STATE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(state_dir: str | Path, fingerprint: str) -> dict | None:
    """The saved state, or None when there is none; refuses a state from a different run."""
    from lowbit.spec import QuantSpec

    path = Path(state_dir) / STATE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=False)
    except Exception as e:
        raise LowbitError(f"{path} is not a readable calibration state ({e}); delete it to start over") from None
    if payload.get("fingerprint") != fingerprint:
        raise LowbitError(f"{path} belongs to a different model, recipe or calibration set; "
                          "delete it or pick another state folder")
    payload["qweights"] = {n: QuantizedWeight(d["codes"], d["scale"], d["zero"], QuantSpec.from_dict(d["spec"]),
                                              d["g_idx"]) for n, d in payload["qweights"].items()}
    log.info("resuming calibration after block %d from %s", payload["block"], path)
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
