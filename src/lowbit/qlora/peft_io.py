"""Adapters in peft's LoRA format: adapter_config.json + adapter_model.safetensors.

Tensor names are peft's: `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r] (float32), so `peft.PeftModel.from_pretrained(original_model, folder)` loads them
(tests/qlora/test_peft_io.py checks it gives the outputs of lowbit's adapted model). lowbit's own
fields (the 4-bit base's type, the base model's fingerprint, the run's metrics) live in a sidecar
`lowbit_adapter.json`, which peft ignores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir
from lowbit.io.tensor_file import SafetensorsReader, write_safetensors
from lowbit.qlora.adapt import Adapted, LoraConfig

CONFIG, WEIGHTS, SIDECAR = "adapter_config.json", "adapter_model.safetensors", "lowbit_adapter.json"
PREFIX = "base_model.model."


def peft_config(adapted: Adapted) -> dict:
    c = adapted.config
    targets = c.targets if isinstance(c.targets, str) else sorted(set(c.targets))
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": adapted.base_name or None,
            "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def adapter_tensors(adapted: Adapted) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in adapted.lora_modules().items():
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous()
    return out


def save_adapter(adapted: Adapted, out: str | Path, extra: dict | None = None) -> Path:
    """Write the adapters as a peft LoRA folder at `out`, atomically (replacing an older one)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(peft_config(adapted), indent=2))
        write_safetensors(tmp / WEIGHTS, adapter_tensors(adapted), {"format": "pt"})
        (tmp / SIDECAR).write_text(json.dumps({"lora": adapted.config.to_dict(), "fingerprint": adapted.fingerprint,
                                                "base": adapted.base_name, **(extra or {})}, indent=2))
    return out


def read_adapter_config(path: str | Path) -> LoraConfig:
    """The LoraConfig of a peft LoRA folder (lowbit's sidecar when present, for the 4-bit base)."""
    path = Path(path)
    file = path / CONFIG
    if not file.is_file():
        raise LowbitError(f"{path} is not a peft adapter folder (no {CONFIG})")
    try:
        cfg = json.loads(file.read_text())
    except ValueError as e:
        raise LowbitError(f"{file} is not JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise LowbitError(f"{file}: peft_type {cfg.get('peft_type')!r}; lowbit reads LORA adapters")
    side = path / SIDECAR
    lora = json.loads(side.read_text()).get("lora", {}) if side.is_file() else {}
    targets = cfg.get("target_modules") or []
    return LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=targets if isinstance(targets, str) else tuple(targets),
                      quant_type=lora.get("quant_type"), double_quant=lora.get("double_quant", True))


@torch.no_grad()
def load_adapter(adapted: Adapted, path: str | Path) -> None:
    """Copy a peft LoRA folder's tensors into the adapted model's adapters (names and shapes must match)."""
    path = Path(path)
    reader = SafetensorsReader(path / WEIGHTS)
    mods = adapted.lora_modules()
    seen = set()
    for key in reader.keys():
        name = key.removeprefix(PREFIX)
        module, _, leaf = name.rpartition(".lora_")
        if module not in mods or leaf not in ("A.weight", "B.weight"):
            raise LowbitError(f"{path / WEIGHTS}: {key} has no adapter in the model (adapted: {len(mods)} Linears)")
        target = getattr(mods[module], "lora_" + leaf.split(".")[0]).weight
        t = reader.get_tensor(key)
        if tuple(t.shape) != tuple(target.shape):
            raise LowbitError(f"{path / WEIGHTS}: {key} has shape {tuple(t.shape)}, the model wants {tuple(target.shape)}")
        target.copy_(t)
        seen.add(module)
    if missing := sorted(set(mods) - seen):
        raise LowbitError(f"{path}: no adapter tensors for {missing[0]} (and {len(missing) - 1} more)")


def copy_adapter(src: str | Path, dst: str | Path) -> None:
    with atomic_dir(dst) as tmp:
        for f in (CONFIG, WEIGHTS, SIDECAR):
            if (Path(src) / f).is_file():
                shutil.copy2(Path(src) / f, tmp / f)
