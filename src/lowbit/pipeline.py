"""The one orchestration loop: plan -> calibrate block by block -> quantize each Linear -> swap.

Block i is calibrated on the outputs of the already-quantized block i-1; inside a block the
Linears are quantized in the architecture's sequential groups, so each group sees inputs that
already went through the quantized groups before it. Memory stays bounded by one block plus the
calibration activations.
"""

from __future__ import annotations

import copy
import logging

import torch
from tqdm.auto import tqdm

from lowbit.calibration.capture import BlockInputs, StopForward, capture_first_block_inputs, run_block
from lowbit.calibration.resume import fingerprint, load_state, save_state
from lowbit.core.finite import all_finite, count_nonfinite
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.models.arch import Arch, arch_for, blocks_of, get_module
from lowbit.recipe import Recipe

log = logging.getLogger(__name__)


def check_finite(model, names) -> None:
    for name in names:
        w = get_module(model, name).weight
        if not all_finite(w):
            bad = count_nonfinite(w)
            raise LowbitError(f"weight of {name} holds {bad} NaN/Inf values; fix the checkpoint before quantizing")


def _quantize_one(method, name, linear, spec, stats, write_back: bool = True) -> QuantizedWeight:
    qw = method.quantize_linear(name, linear.weight.detach().float(), spec, stats)
    if write_back:  # later groups and blocks must see this layer's quantized outputs
        linear.weight.data.copy_(qw.dequantize(linear.weight.dtype))
    return qw


def _quantize_group(method, names: list[str], weights: list[torch.Tensor], specs: list, stats: list) -> list:
    """One sequential group's Linears; methods with `quantize_group` may share work across them
    (GPTQ stacks Linears that read the same input into one run)."""
    if hasattr(method, "quantize_group"):
        return method.quantize_group(names, weights, specs, stats)
    return [method.quantize_linear(n, w, sp, st) for n, w, sp, st in zip(names, weights, specs, stats)]


def _feed(stats, x, name, seen: set, n_hooked: int) -> None:
    stats.add(x)
    seen.add(name)
    if len(seen) == n_hooked:  # every Linear of the group has its input: stop this chunk here
        seen.clear()
        raise StopForward


def _working_copy(block, dtype: torch.dtype | None):
    """The block the calibration forwards run through: a copy in `dtype` (bf16 matmuls are several
    times faster here), or the block itself. Quantization always reads the original weights."""
    if dtype is None or all(p.dtype == dtype for p in block.parameters() if p.is_floating_point()):
        return block
    return copy.deepcopy(block).to(dtype)


def _calibrated_block(method, block, prefix: str, arch: Arch, plan: dict, inputs: BlockInputs,
                      calib_dtype: torch.dtype | None = None) -> tuple[dict, list[torch.Tensor]]:
    """Quantize one block's planned Linears group by group; returns them and the block's outputs
    (computed with the quantized weights) for the next block."""
    qweights = {}
    local_plan = {n: plan[f"{prefix}.{n}"] for n in arch.linears if f"{prefix}.{n}" in plan}
    method.prepare_block(block, lambda: run_block(block, inputs), arch, local_plan)
    work = _working_copy(block, calib_dtype)
    for group in arch.sequential:
        names = [n for n in group if n in local_plan]
        if not names:
            continue
        stats, handles = {}, []
        seen: set = set()  # hooked Linears that got this chunk's input; then the rest of the forward is skipped
        for n in names:
            lin = get_module(work, n)
            stats[n] = method.make_stats(f"{prefix}.{n}", lin)
            if stats[n] is not None:
                handles.append(lin.register_forward_pre_hook(
                    lambda _m, args, s=stats[n], n=n: _feed(s, args[0], n, seen, len(handles))))
        if handles:
            try:
                run_block(work, inputs)
            finally:
                for h in handles:
                    h.remove()
        originals = [get_module(block, n) for n in names]
        results = _quantize_group(method, [f"{prefix}.{n}" for n in names],
                                  [lin.weight.detach().float() for lin in originals],
                                  [local_plan[n] for n in names], [stats[n] for n in names])
        for n, lin, qw in zip(names, originals, results):
            qweights[f"{prefix}.{n}"] = qw
            # later groups and blocks must see this layer's quantized outputs
            for target in {id(lin): lin, id(get_module(work, n)): get_module(work, n)}.values():
                target.weight.data.copy_(qw.dequantize(target.weight.dtype))
    return qweights, run_block(work, inputs)


def quantize_model(model, recipe: Recipe, method, calib_ids: torch.Tensor | None = None,
                   progress: bool = True, swap: bool = True, state_dir=None,
                   calib_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, QuantizedWeight]:
    """Quantize `model` in place per `recipe` with `method`; returns {name: QuantizedWeight}.

    Calibration forwards (and the activations kept between blocks) run in `calib_dtype` (None:
    the model's dtype); the weights are always quantized from the model's own precision.

    With swap=True every quantized Linear is replaced by a packed QuantLinear. With `state_dir`,
    a calibrated run saves its state after each block and resumes from it (bit-identical).
    """
    arch = arch_for(model)
    plan = recipe.plan(model, arch)
    check_finite(model, plan)
    if arch.head in plan:
        untie_head(model, arch)
    blocks = blocks_of(model, arch)
    qweights: dict[str, QuantizedWeight] = {}
    inputs = None
    if method.needs_calibration:
        if calib_ids is None or calib_ids.numel() == 0:
            raise LowbitError(f"method {recipe.method!r} needs calibration text; none was given")
        inputs, block_kwargs = capture_first_block_inputs(model, arch, calib_ids, dtype=calib_dtype)
    start = 0
    fp = None
    if state_dir is not None and inputs is not None:
        fp = fingerprint(recipe, calib_ids, model)
        state = load_state(state_dir, fp)
        if state is not None:
            for name, qw in state["qweights"].items():
                get_module(model, name).weight.data.copy_(qw.dequantize(get_module(model, name).weight.dtype))
            qweights.update(state["qweights"])
            if hasattr(method, "layer_errors"):
                method.layer_errors.update(state["layer_errors"])
            inputs = BlockInputs(state["hidden"], inputs.kwargs)
            start = state["block"] + 1
    bar = tqdm(range(start, len(blocks)), desc=f"{recipe.method} blocks", disable=not progress, unit="block",
               initial=start, total=len(blocks))
    for i in bar:
        prefix = f"{arch.blocks}.{i}"
        block = blocks[i]
        if inputs is not None:
            inputs = BlockInputs(inputs.hidden, block_kwargs[i])
            done, outputs = _calibrated_block(method, block, prefix, arch, plan, inputs, calib_dtype)
            qweights.update(done)
            inputs = BlockInputs(outputs, inputs.kwargs)
            if fp is not None:
                save_state(state_dir, i, fp, qweights, inputs.hidden, getattr(method, "layer_errors", None))
        else:
            for n in arch.linears:
                full = f"{prefix}.{n}"
                if full in plan:
                    qweights[full] = _quantize_one(method, full, get_module(block, n), plan[full], None,
                                                   write_back=not swap)
    for name in plan:
        if name not in qweights:  # lm_head and anything outside the blocks
            qweights[name] = _quantize_one(method, name, get_module(model, name), plan[name], None,
                                           write_back=not swap)
    if swap:
        swap_quantized(model, qweights)
    return qweights


def untie_head(model, arch: Arch) -> None:
    """Give the head its own weight so quantizing it leaves the embeddings untouched."""
    head, embed = get_module(model, arch.head), get_module(model, arch.embed)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def swap_quantized(model, qweights: dict[str, QuantizedWeight]) -> None:
    """Replace each quantized Linear by a QuantLinear holding packed codes."""
    from lowbit.nn import QuantLinear
    from lowbit.nn.replace import replace_linear

    arch = arch_for(model)
    for name, qw in qweights.items():
        lin = get_module(model, name)
        if name == arch.head:
            untie_head(model, arch)
        bias = None if lin.bias is None else lin.bias.detach()
        replace_linear(model, name, QuantLinear.from_quantized(qw, bias))
