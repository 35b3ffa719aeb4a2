"""A recipe says what to quantize and how: default spec, method, per-layer overrides, ignore list."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.models.arch import Arch, blocks_of, get_module
from lowbit.spec import QuantSpec


@dataclass(frozen=True)
class Recipe:
    spec: QuantSpec
    method: str = "rtn"
    ignore: tuple[str, ...] = ()  # regexes of module names kept in full precision
    overrides: tuple[tuple[str, QuantSpec], ...] = ()  # (regex, spec), first match wins
    quantize_head: bool = False
    head_spec: QuantSpec | None = None
    options: dict = field(default_factory=dict)  # method options (damp, act_order, ...)

    def spec_for(self, name: str) -> QuantSpec | None:
        if any(re.search(p, name) for p in self.ignore):
            return None
        for pattern, spec in self.overrides:
            if re.search(pattern, name):
                return spec
        return self.spec

    def plan(self, model, arch: Arch) -> dict[str, QuantSpec]:
        """{module name: spec} for every Linear to quantize, checked against its shape."""
        plan: dict[str, QuantSpec] = {}
        for i, _ in enumerate(blocks_of(model, arch)):
            for lin in arch.linears:
                name = f"{arch.blocks}.{i}.{lin}"
                spec = self.spec_for(name)
                if spec is not None:
                    plan[name] = spec
        if self.quantize_head:
            spec = self.head_spec or self.spec
            if self.spec_for(arch.head) is not None:
                plan[arch.head] = spec
        for name, spec in plan.items():
            try:
                mod = get_module(model, name)
            except AttributeError:
                raise LowbitError(f"module {name} does not exist in this model") from None
            if not isinstance(mod, torch.nn.Linear):
                raise LowbitError(f"module {name} is a {type(mod).__name__}, not a Linear")
            spec.check_shape(mod.out_features, mod.in_features, name)
        return plan


def _spec_from(d: dict, base: QuantSpec | None = None) -> QuantSpec:
    merged = dict(base.to_dict()) if base else {}
    merged.update(d)
    if "group_size" in d and d["group_size"] and "granularity" not in d:
        merged["granularity"] = "group"
    try:
        return QuantSpec.from_dict(merged)
    except TypeError as e:
        raise LowbitError(f"bad spec {d}: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    """YAML: {method, bits, group_size, symmetric, ignore: [regex], overrides: [{pattern, bits, ...}],
    quantize_head, options: {...}}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LowbitError(f"recipe {path} is not valid YAML: {e}") from None
    base = _spec_from({k: data[k] for k in ("bits", "dtype", "symmetric", "granularity", "group_size") if k in data})
    overrides = []
    for o in data.get("overrides", []):
        if "pattern" not in o:
            raise LowbitError(f"recipe {path}: every override needs a 'pattern' (regex of module names)")
        overrides.append((o["pattern"], _spec_from({k: v for k, v in o.items() if k != "pattern"}, base)))
    return Recipe(
        spec=base,
        method=data.get("method", "rtn"),
        ignore=tuple(data.get("ignore", [])),
        overrides=tuple(overrides),
        quantize_head=bool(data.get("quantize_head", False)),
        options=dict(data.get("options", {})),
    )
