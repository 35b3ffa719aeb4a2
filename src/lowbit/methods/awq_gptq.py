"""AWQ+GPTQ: AWQ's scales searched and folded first, then GPTQ's rounding on the scaled weights.

Composed, not inherited: the block transform is AWQ's, the per-group quantization GPTQ's.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from lowbit.methods.awq import smooth_block
from lowbit.methods.base import positive
from lowbit.methods.gptq import GPTQOptions, gptq_group, run_gptq
from lowbit.methods.stats import HessianMethod


@dataclasses.dataclass(frozen=True)
class AWQGPTQOptions:
    n_grid: int = 20  # AWQ's α grid
    search_samples: int = 16  # calibration samples AWQ's α search runs on
    damp: float = GPTQOptions.damp
    block_size: int = GPTQOptions.block_size
    act_order: bool = GPTQOptions.act_order
    static_groups: bool = GPTQOptions.static_groups
    clip: bool = GPTQOptions.clip
    max_shrink: float = GPTQOptions.max_shrink
    rounding: Literal["minmax", "hqq"] = GPTQOptions.rounding

    def __post_init__(self):
        positive("awq+gptq", n_grid=self.n_grid, search_samples=self.search_samples)
        fields = {f.name for f in dataclasses.fields(GPTQOptions)}
        GPTQOptions(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})  # GPTQ's checks


class AWQGPTQ(HessianMethod):
    name = "awq+gptq"
    smooths = True  # module_pipeline: AWQ scales found and folded on any nn.Module (module_awq)
    Options = AWQGPTQOptions

    def prepare_block(self, block, run_block, arch, plan, search=None) -> bool:
        super().prepare_block(block, run_block, arch, plan, search)
        smooth_block(block, run_block, arch, plan, search, self.options.n_grid, self.options.search_samples)
        return True

    def quantize_linear(self, name, W, spec, stats):
        return run_gptq(self.options, name, W, spec, stats.H).qweight

    def quantize_group(self, names, weights, specs, stats):
        return gptq_group(self.options, names, weights, specs, stats)
