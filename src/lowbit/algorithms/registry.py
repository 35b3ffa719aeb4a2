"""Methods the pipeline can run, by name. A method is a small object:

- `needs_calibration`: whether the pipeline must run calibration data through the blocks;
- `make_stats(name, linear)`: an accumulator with `.add(x)` fed the Linear's inputs (or None);
- `prepare_block(block, run_block, arch, plan, search)`: optional block-level transform before
  quantizing (AWQ scale search and folding); `search` is a working copy of the block (possibly in
  bf16) that `run_block()` runs on the calibration inputs; returns True when it changed `block`;
- `quantize_linear(name, W, spec, stats) -> QuantizedWeight`.
"""

from __future__ import annotations

from lowbit.algorithms import rtn
from lowbit.errors import LowbitError


class RTN:
    name = "rtn"
    needs_calibration = False

    def __init__(self, **options):
        self.options = options

    def make_stats(self, name, linear):
        return None

    def prepare_block(self, block, run_block, arch, plan, search=None):
        return False

    def quantize_linear(self, name, W, spec, stats):
        return rtn.quantize_weight(W, spec)


def _builders() -> dict:
    from lowbit.algorithms.calibrated import METHODS  # gptq, hqq, awq, awq+gptq

    return {"rtn": RTN, **METHODS}


def method_names() -> list[str]:
    return sorted(_builders())


def get_method(name: str, **options):
    builders = _builders()
    if name not in builders:
        raise LowbitError(f"unknown method {name!r}; choose one of {', '.join(sorted(builders))}")
    return builders[name](**options)
