"""The Method interface the pipeline drives, and typed, validated method options.

A method is a small object with a frozen options dataclass (`Options`) and these hooks:

- `needs_calibration`: whether the pipeline runs calibration data through the blocks;
- `make_stats(name, linear)`: an accumulator with `.add(x)` fed the Linear's inputs, or None;
- `prepare_block(block, run_block, arch, plan, search)`: optional block-level transform before
  quantizing (AWQ's scale search and folding); `search` is a working copy of the block (possibly
  bf16) that `run_block()` runs on the calibration inputs; returns True when it changed `block`;
- `quantize_group(names, weights, specs, stats)`: the Linears of one sequential group (default:
  `quantize_linear` on each);
- `quantize_linear(name, W, spec, stats) -> QuantizedWeight`: the record, its `error` set when the
  method measured one.

Options come from Python (`get_method("gptq", damp=0.02)`), a recipe's `options:` or the CLI's
`--option key=value`; unknown keys and wrong types fail before any work, naming the key and the
method's valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import ClassVar, Literal

import torch

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


def _coerce(method: str, key: str, value, hint):
    where = f"method {method!r} option {key!r}"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise LowbitError(f"{where} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise LowbitError(f"{where} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LowbitError(f"{where} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LowbitError(f"{where} must be a number; got {value!r}")
        return float(value)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise LowbitError(f"{where} must be a list of strings; got {value!r}")
        return tuple(value)
    raise TypeError(f"unsupported option type {hint!r} for {where}")  # a bug in an Options class


def parse_options(options_cls, method: str, values: Mapping):
    """A frozen `options_cls` from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(values, Mapping):
        raise LowbitError(f"options of method {method!r} must be a mapping of key: value; got {values!r}")
    fields = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise LowbitError(f"method {method!r} has no option {unknown[0]!r}; valid options: "
                          f"{', '.join(fields) if fields else 'none'}")
    hints = typing.get_type_hints(options_cls)
    return options_cls(**{k: _coerce(method, k, v, hints[k]) for k, v in values.items()})


def positive(method: str, **values) -> None:
    for key, v in values.items():
        if not v > 0:
            raise LowbitError(f"method {method!r} option {key!r} must be > 0; got {v!r}")


class Method:
    name: ClassVar[str] = "method"
    Options: ClassVar[type] = NoOptions
    needs_calibration: ClassVar[bool] = False

    def __init__(self, options=None, **kwargs):
        if isinstance(options, self.Options) and not kwargs:
            self.options = options
        else:
            if isinstance(options, self.Options):
                options = dataclasses.asdict(options)
            self.options = parse_options(self.Options, self.name, {**(options or {}), **kwargs})

    def fingerprint(self) -> str:
        """Name and every option value: what a resumed run must match."""
        return f"{self.name}:{json.dumps(dataclasses.asdict(self.options), sort_keys=True)}"

    def make_stats(self, name: str, linear: torch.nn.Linear):
        return None

    def prepare_block(self, block, run_block, arch, plan, search=None) -> bool:
        return False

    def quantize_linear(self, name: str, W: torch.Tensor, spec: QuantSpec, stats) -> QuantizedWeight:
        raise NotImplementedError

    def quantize_group(self, names, weights, specs, stats) -> list[QuantizedWeight]:
        return [self.quantize_linear(n, w, sp, st) for n, w, sp, st in zip(names, weights, specs, stats)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
