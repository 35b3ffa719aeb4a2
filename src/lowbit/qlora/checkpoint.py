"""Training checkpoints: adapters, optimizer state and the step, written atomically to one folder.

OUT/checkpoint/ holds adapters.safetensors, optimizer.pt and state.json (step, the base model's
fingerprint, the LoRA and training configs, the losses so far). A run killed at any moment leaves
the previous complete checkpoint; rerunning the same command resumes from it. A checkpoint of
another model (other fingerprint) or other adapters (other LoRA config) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir
from lowbit.io.tensor_file import SafetensorsReader, write_safetensors
from lowbit.qlora.adapt import Adapted

FOLDER, STATE, ADAPTERS, OPTIMIZER = "checkpoint", "state.json", "adapters.safetensors", "optimizer.pt"


def save(out: Path, adapted: Adapted, optimizer: torch.optim.Optimizer, state: dict) -> None:
    with atomic_dir(Path(out) / FOLDER) as tmp:
        write_safetensors(tmp / ADAPTERS, {n: t.float().contiguous() for n, t in adapted.adapter_state().items()})
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps({**state, "fingerprint": adapted.fingerprint,
                                             "lora": adapted.config.to_dict()}, indent=1))


def load(out: Path, adapted: Adapted, optimizer: torch.optim.Optimizer) -> dict | None:
    """The saved state after loading adapters and optimizer from OUT/checkpoint, or None when there is none."""
    folder = Path(out) / FOLDER
    if not (folder / STATE).is_file():
        return None
    try:
        state = json.loads((folder / STATE).read_text())
    except ValueError as e:
        raise LowbitError(f"{folder / STATE} is not JSON ({e}); delete {folder} to start over") from None
    if state.get("fingerprint") != adapted.fingerprint:
        raise LowbitError(f"{folder} is a checkpoint of another model (base {state.get('base') or '?'}, fingerprint "
                          f"{state.get('fingerprint')}; this model's is {adapted.fingerprint}); pass another -o "
                          "folder or delete the checkpoint")
    if state.get("lora") != adapted.config.to_dict():
        raise LowbitError(f"{folder} was trained with other adapters ({state.get('lora')}); rerun with the same "
                          "LoRA options, pass another -o folder, or delete the checkpoint")
    reader = SafetensorsReader(folder / ADAPTERS)
    params = dict(adapted.model.named_parameters())
    with torch.no_grad():
        for name in adapted.adapter_state():
            if name not in reader.keys():
                raise LowbitError(f"{folder / ADAPTERS} lacks {name}; delete {folder} to start over")
            params[name].copy_(reader.get_tensor(name))
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER, weights_only=True))
    return state
