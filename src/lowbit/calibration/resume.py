"""Resumable calibration: after each finished block, that block's quantized weights and the next
block's inputs are written atomically; an interrupted run continues from the last finished block.

Layout of a state folder, safetensors only (no pickle: loading a state never runs code from it):
`block_NNNN.safetensors` per finished block (its layers' codes, scale, zero, g_idx; written once)
and `calibration_state.safetensors` (the next block's inputs). Each file's header carries one
metadata entry, `lowbit_state`: sorted JSON with the run's fingerprint, the block number, the
layers' specs or every layer's error so far. The fingerprint is read from the header and checked
before any tensor is read. The state file is written last and is the commit point: a block file
beyond the block it names (an interruption between the two writes) is ignored and later overwritten.

`claim_state_dir` manages the state folder `lowbit quantize` keeps by default beside its output.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_path, atomic_write_bytes
from lowbit.io.tensor_file import write_safetensors

log = logging.getLogger(__name__)
STATE = "calibration_state.safetensors"
KEY = "lowbit_state"  # the one metadata entry
LEGACY = ("calibration_state.pt", "block_*.pt")  # pickles of earlier versions: never loaded
RUN = "run.json"


def _block_file(state_dir: Path, block: int) -> Path:
    return state_dir / f"block_{block:04d}.safetensors"


def _save(tensors: dict[str, torch.Tensor], info: dict, path: Path) -> None:
    with atomic_path(path) as tmp:  # streamed, no copies: the next block's inputs are tens of MiB
        write_safetensors(tmp, tensors, {KEY: json.dumps(info, sort_keys=True)})


def _refuse_legacy(state_dir: Path) -> None:
    for pattern in LEGACY:
        for old in sorted(state_dir.glob(pattern)):
            raise LowbitError(f"{old} is a calibration state in the pickle format of earlier lowbit versions, "
                              "which is never loaded (a pickle can run code); delete it to start over")


def _open(path: Path, fingerprint: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(info, tensors) of a state file whose header carries `fingerprint`; the header is parsed
    and checked before any tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})[KEY])
            if not isinstance(info, dict):
                raise ValueError(f"{KEY} is not a JSON object")
            if info.get("fingerprint") != fingerprint:
                raise _Mismatch()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except _Mismatch:
        raise LowbitError(f"{path} belongs to a different model, recipe or calibration set; "
                          "delete it or pick another state folder") from None
    except Exception as e:  # safetensors raises its own error types on a malformed file
        raise LowbitError(f"{path} is not a readable calibration state ({type(e).__name__}: {e}); "
                          "delete it to start over") from None
    return info, tensors


class _Mismatch(Exception):
    pass


def save_state(state_dir: str | Path, block: int, fingerprint: str, block_qweights: dict[str, QuantizedWeight],
               hidden: list[torch.Tensor], layer_errors: dict | None) -> None:
    """Record that `block` is finished: its layers (`block_qweights`, this block's only) and the
    next block's inputs `hidden`."""
    state_dir = Path(state_dir)
    tensors, specs = {}, {}
    for name, q in block_qweights.items():
        specs[name] = q.spec.to_dict()
        for part in ("codes", "scale", "zero", "g_idx"):
            t = getattr(q, part)
            if t is not None:
                tensors[f"{name}.{part}"] = t
    _save(tensors, {"block": block, "fingerprint": fingerprint, "specs": specs}, _block_file(state_dir, block))
    errors = {k: float(v) for k, v in (layer_errors or {}).items()}
    _save({f"hidden.{i:05d}": h for i, h in enumerate(hidden)},
          {"block": block, "fingerprint": fingerprint, "hidden": len(hidden), "layer_errors": errors},
          state_dir / STATE)


def load_state(state_dir: str | Path, fingerprint: str) -> dict | None:
    """{block, hidden, layer_errors, qweights of blocks 0..block}, or None when there is no state;
    refuses a state from a different run, with a block file missing, or in the old pickle format."""
    from lowbit.spec import QuantSpec

    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return None
    _refuse_legacy(state_dir)
    path = state_dir / STATE
    if not path.is_file():
        return None
    info, tensors = _open(path, fingerprint)
    try:
        block, n_hidden = int(info["block"]), int(info["hidden"])
        hidden = [tensors[f"hidden.{i:05d}"] for i in range(n_hidden)]
        layer_errors = {str(k): float(v) for k, v in info["layer_errors"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LowbitError(f"{path} is not a complete calibration state (missing {e}); delete it to start over") from None
    qweights = {}
    for b in range(block + 1):
        part = _block_file(state_dir, b)
        if not part.is_file():
            raise LowbitError(f"{path} names block {block} as finished but {part.name} is missing; "
                              "delete the state folder to start over")
        binfo, t = _open(part, fingerprint)
        try:
            for name, spec in binfo["specs"].items():
                qweights[name] = QuantizedWeight(t[f"{name}.codes"], t[f"{name}.scale"], t.get(f"{name}.zero"),
                                                 QuantSpec.from_dict(spec), t.get(f"{name}.g_idx"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LowbitError(f"{part} is not a complete block state (missing {e}); "
                              "delete the state folder to start over") from None
    log.info("resuming calibration after block %d from %s", block, state_dir)
    return {"block": block, "fingerprint": fingerprint, "hidden": hidden, "layer_errors": layer_errors,
            "qweights": qweights}


def fingerprint(recipe, calib_ids: torch.Tensor, model, extra: str = "") -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(extra.encode())
    h.update(repr(recipe).encode())
    h.update(calib_ids.numpy().tobytes())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(str(sum(p.numel() for p in model.parameters())).encode())
    return h.hexdigest()


def default_state_dir(out: str | Path) -> Path:
    """Where `lowbit quantize` keeps the state of a run writing `out`: a hidden sibling."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}.lowbit-state"


def claim_state_dir(state_dir: str | Path, run: dict) -> Path:
    """Prepare the default state folder for a run described by `run` (JSON-able: source, recipe,
    calibration...): a state left by the same command is kept (the run resumes from it); a state
    of a different command for the same output is removed (the run starts over)."""
    state_dir = Path(state_dir)
    record = json.dumps(run, sort_keys=True, default=str)
    if state_dir.is_dir():
        try:
            same = (state_dir / RUN).read_text() == record
        except OSError:
            same = False
        if not same:
            log.warning("removing %s: the state of an earlier, different run for the same output", state_dir)
            shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state_dir / RUN, record.encode())
    return state_dir
