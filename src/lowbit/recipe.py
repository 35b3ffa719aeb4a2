"""A recipe says what to quantize and how: default spec, method, per-layer overrides, ignore list."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.name_rules import setting_for
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
    embed_spec: QuantSpec | None = None  # the input embedding's int8 table (round to nearest), or None

    def spec_for(self, name: str) -> QuantSpec | None:
        return setting_for(name, self.spec, self.ignore, self.overrides)

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
        if self.embed_spec is not None:
            self.check_embedding(model, arch, plan)
        return plan

    def check_embedding(self, model, arch: Arch, plan: dict) -> None:
        from lowbit.nn.quant_embedding import check_embedding_spec

        embed = get_module(model, arch.embed)
        if not isinstance(embed, torch.nn.Embedding):
            raise LowbitError(f"module {arch.embed} is a {type(embed).__name__}, not an Embedding")
        check_embedding_spec(self.embed_spec, embed.embedding_dim, arch.embed)
        if getattr(model.config, "tie_word_embeddings", False) and arch.head not in plan:
            raise LowbitError(f"{arch.head} shares {arch.embed}'s table in this model: an int8 embedding alone "
                              f"would leave the float head in memory; quantize the head too (--head-bits 8)")


SPEC_KEYS = {"bits": int, "dtype": str, "symmetric": bool, "granularity": str, "group_size": (int, type(None)),
             "integer_zero": bool, "scale_dtype": str, "scaled_zero": bool, "superblock": (int, type(None)),
             "scale_bits": (int, type(None))}
TOP_KEYS = {"method", "ignore", "overrides", "quantize_head", "head", "embed", "options", *SPEC_KEYS}


def _typed(where: str, key: str, value, types):
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("null" if t is type(None) else {"int": "an integer", "str": "a string",
                                                              "bool": "true or false"}[t.__name__] for t in types)
        raise LowbitError(f"{where}: {key!r} must be {names}; got {value!r}")
    return value


def _regex(where: str, pattern) -> str:
    if not isinstance(pattern, str):
        raise LowbitError(f"{where}: {pattern!r} is not a string (a regex of module names)")
    try:
        re.compile(pattern)
    except re.error as e:
        raise LowbitError(f"{where}: {pattern!r} is not a valid regex ({e})") from None
    return pattern


def _spec_from(d: dict, base: QuantSpec | None = None, where: str = "recipe") -> QuantSpec:
    merged = dict(base.to_dict()) if base else {}
    for k, v in d.items():
        merged[k] = _typed(where, k, v, SPEC_KEYS[k])
    if "group_size" in d and d["group_size"] and "granularity" not in d:
        merged["granularity"] = "group"
    try:
        return QuantSpec.from_dict(merged)
    except LowbitError as e:
        raise LowbitError(f"{where}: {e}") from None


def _sub_spec(data: dict, key: str, base: QuantSpec | None, where: str) -> QuantSpec | None:
    """A recipe's own spec for one module (`head:`, `embed:`), over `base` when given."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - set(SPEC_KEYS):
        bad = sorted(set(value) - set(SPEC_KEYS)) if isinstance(value, dict) else [value]
        raise LowbitError(f"{where}: {key!r} must be a mapping of spec keys ({', '.join(SPEC_KEYS)}); got {bad[0]!r}")
    return _spec_from(value, base, f"{where}: {key}")


def load_recipe(path: str | Path) -> Recipe:
    """YAML: {method, bits, dtype, symmetric, granularity, group_size, integer_zero, scale_dtype,
    ignore: [regex], overrides: [{pattern, bits, ...}], quantize_head, head: {bits, ...} (lm_head's own
    spec; implies quantize_head), embed: {bits: 8, group_size: 32} (int8 input embedding), options: {...}}. Every key
    and value is checked; the first problem raises one LowbitError naming the file and the key."""
    import yaml

    from lowbit.methods import get_method

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LowbitError(f"recipe {path} is not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise LowbitError(f"recipe {path} must be a mapping of key: value at the top level; got a {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - TOP_KEYS)
    if unknown:
        raise LowbitError(f"recipe {path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(TOP_KEYS))}")
    where = f"recipe {path}"
    base = _spec_from({k: data[k] for k in SPEC_KEYS if k in data}, where=where)
    ignore = data.get("ignore", [])
    if not isinstance(ignore, list):
        raise LowbitError(f"{where}: 'ignore' must be a list of regexes; got {ignore!r}")
    overrides = []
    raw_overrides = data.get("overrides", [])
    if not isinstance(raw_overrides, list):
        raise LowbitError(f"{where}: 'overrides' must be a list of {{pattern: regex, bits: ..., ...}}")
    for i, o in enumerate(raw_overrides):
        w = f"{where}: overrides[{i}]"
        if not isinstance(o, dict) or "pattern" not in o:
            raise LowbitError(f"{w} needs a 'pattern' (regex of module names) and spec keys")
        bad = sorted(set(o) - {"pattern"} - set(SPEC_KEYS))
        if bad:
            raise LowbitError(f"{w}: unknown key {bad[0]!r}; valid keys: pattern, {', '.join(SPEC_KEYS)}")
        overrides.append((_regex(w, o["pattern"]), _spec_from({k: v for k, v in o.items() if k != "pattern"}, base, w)))
    head = _sub_spec(data, "head", base, where)
    embed = _sub_spec(data, "embed", None, where)
    method = _typed(where, "method", data.get("method", "rtn"), str)
    options = data.get("options") or {}
    try:
        get_method(method, options)  # unknown or mistyped options fail here, before any work
    except LowbitError as e:
        raise LowbitError(f"{where}: {e}") from None
    return Recipe(
        spec=base,
        method=method,
        ignore=tuple(_regex(f"{where}: ignore", p) for p in ignore),
        overrides=tuple(overrides),
        quantize_head=_typed(where, "quantize_head", data.get("quantize_head", False), bool) or head is not None,
        head_spec=head,
        options=dict(options),
        embed_spec=embed,
    )
