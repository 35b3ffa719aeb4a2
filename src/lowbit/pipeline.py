"""The one orchestration loop: plan -> calibrate block by block -> quantize each Linear -> swap.

Block i is calibrated on the outputs of the already-quantized block i-1; inside a block the
Linears are quantized in the architecture's sequential groups, so each group sees inputs that
already went through the quantized groups before it. Memory stays bounded by one block plus the
calibration activations.
"""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from collections.abc import MutableMapping

import torch
from tqdm.auto import tqdm

from lowbit.calibration.capture import BlockInputs, block_dtype, capture_first_block_inputs, run_block
from lowbit.calibration.lockstep import Lockstep
from lowbit.calibration.resume import fingerprint, load_state, save_state
from lowbit.core.cpu_features import compute_dtype
from lowbit.core.finite import all_finite, count_nonfinite
from lowbit.core.quantize import QuantizedWeight, quantize
from lowbit.errors import LowbitError
from lowbit.models.arch import Arch, arch_for, blocks_of, get_module
from lowbit.models.lazy import materialize_block, park, unpark
from lowbit.recipe import Recipe
from lowbit.runtime.memory import release_free_memory

log = logging.getLogger(__name__)


def check_finite(model, names) -> None:
    for name in names:
        w = get_module(model, name).weight
        if not all_finite(w):
            bad = count_nonfinite(w)
            raise LowbitError(f"weight of {name} holds {bad} NaN/Inf values; fix the checkpoint before quantizing")


def _quantize_one(method, name, linear, spec, stats, write_back: bool = True) -> QuantizedWeight:
    if stats is None and method.needs_calibration:
        # outside the decoder blocks (lm_head) no calibration statistics are gathered
        log.info("%s: no calibration statistics outside the decoder blocks; rounded to nearest (%s)",
                 name, spec.describe())
        qw = quantize(linear.weight.detach().float(), spec)
    else:
        qw = method.quantize_linear(name, linear.weight.detach().float(), spec, stats)
    if write_back:  # later groups and blocks must see this layer's quantized outputs
        linear.weight.data.copy_(qw.dequantize(linear.weight.dtype))
    return qw


def working_copy(block, dtype: torch.dtype | None):
    """The block the calibration forwards run through: a copy in `dtype` (bf16 matmuls are several
    times faster here), or the block itself. Quantization always reads the original weights."""
    if dtype is None or block_dtype(block) == dtype:
        return block
    return copy.deepcopy(block).to(dtype)


def _calibrated_block(method, block, prefix: str, arch: Arch, plan: dict, inputs: BlockInputs,
                      calib_dtype: torch.dtype | None = None,
                      swap_into=None) -> tuple[dict, list[torch.Tensor]]:
    """Quantize one block's planned Linears group by group; returns them and the block's outputs
    (computed with the quantized weights) for the next block.

    One forward of the block over all chunks, in lockstep (`calibration.lockstep`): at the first
    Linear of each sequential group every chunk feeds its input to the group's statistics and
    waits; the last chunk quantizes the group, then all chunks go on with the quantized weights.
    The working copy always gets the dequantized weights. The original block's Linears get them
    too, or with `swap_into` (the model) are replaced by packed QuantLinears: as soon as their
    group is done when the forwards run on a separate working copy (their float32 weights go at
    once, 10 MiB per SmolLM2 block by the down_proj barrier, and a failure leaves a consistent
    model), else once the forward is over.
    """
    qweights = {}
    local_plan = {n: plan[f"{prefix}.{n}"] for n in arch.linears if f"{prefix}.{n}" in plan}
    work = working_copy(block, calib_dtype)
    if method.prepare_block(block, lambda: run_block(work, inputs), arch, local_plan, search=work) and work is not block:
        work = working_copy(block, calib_dtype)  # the transformed weights, rounded once
    groups = [names for names in ([n for n in g if n in local_plan] for g in arch.sequential) if names]
    stats = {n: method.make_stats(f"{prefix}.{n}", get_module(work, n)) for names in groups for n in names}
    done: set = set()

    def quantize_group(names: list[str], pending: list) -> None:
        # every chunk's input to the group, in chunk order (the same sums as feeding them on
        # arrival), added here by the one thread that runs the barrier: MKL keeps ~10 MiB of
        # buffers per thread that calls it, 85 MiB when each chunk's thread fed its own
        for x in pending:
            for n in names:
                if stats[n] is not None:
                    stats[n].add(x)
        pending.clear()
        originals = [get_module(block, n) for n in names]
        results = method.quantize_group([f"{prefix}.{n}" for n in names],
                                  [lin.weight.detach().float() for lin in originals],
                                  [local_plan[n] for n in names], [stats[n] for n in names])
        for n, lin, qw in zip(names, originals, results):
            qweights[f"{prefix}.{n}"] = qw
            # the rest of this forward and later groups see the quantized outputs
            target = get_module(work, n)
            target.weight.data.copy_(qw.dequantize(target.weight.dtype))
            if lin is target:
                continue
            if swap_into is not None:
                swap_quantized(swap_into, {f"{prefix}.{n}": qw})
            else:
                lin.weight.data.copy_(qw.dequantize(lin.weight.dtype))
        del originals
        for n in names:
            stats[n] = None  # the group's Hessian (and its buffers) is not needed any more
        done.add(tuple(names))
        release_free_memory()  # every chunk is paused here: drop what the forward so far freed

    lock = Lockstep(len(inputs.hidden))
    handles = []
    for names in groups:
        seen: dict = {}  # chunk -> the input its group saw first (the group's Linears share it)
        pending: list = []  # those inputs, in chunk order, until the barrier feeds them to the statistics
        hook = functools.partial(_group_hook, lock, prefix, names, seen, pending,
                                 functools.partial(quantize_group, names, pending))
        handles += [get_module(work, n).register_forward_pre_hook(hook) for n in names]
    try:
        outputs = run_block(work, inputs, runner=lock.run)
    finally:
        for h in handles:
            h.remove()
    for names in groups:
        if tuple(names) not in done:
            raise LowbitError(f"{prefix}: the block's forward never reached {', '.join(names)}; "
                              "the architecture table does not match this model")
    if swap_into is not None and work is block:  # the forward itself ran on these Linears
        swap_quantized(swap_into, qweights)
    return qweights, outputs


def _group_hook(lock, prefix, names, seen, pending, quantize_group, _module, args) -> None:
    c = lock.current()
    x = args[0]
    if c in seen:  # another Linear of the group, same chunk: it must read the same tensor
        if seen[c]() is not x:
            raise LowbitError(f"{prefix}: {', '.join(names)} form one sequential group but read different inputs; "
                              "fix the architecture's sequential groups")
        return
    seen[c] = weakref.ref(x)
    pending.append(x)  # alive anyway while this chunk waits at the barrier
    lock.barrier(quantize_group)


def quantize_model(model, recipe: Recipe, method, calib_ids: torch.Tensor | None = None,
                   progress: bool = True, swap: bool = True, state_dir=None,
                   calib_dtype: torch.dtype | None | str = "auto") -> "QuantizedLayers":
    """Quantize `model` in place per `recipe` with `method`; returns {name: QuantizedWeight}.

    Calibration forwards (and the activations kept between blocks) run in `calib_dtype` ("auto":
    bfloat16 where this CPU multiplies it natively, float32 elsewhere, `core.cpu_features`; None:
    the model's dtype); the weights are always quantized from the model's own precision.

    With swap=True each finished block's Linears are replaced by packed QuantLinears at once
    (with a model from `load_lazy`, blocks are read from disk as they are reached, so the
    full-precision model is never resident whole, and its embeddings wait on disk while the blocks
    are processed: `models.lazy.park`). With `state_dir`, a calibrated run saves its
    state after each block and resumes from it (bit-identical). Process-wide memory settings are
    not touched here: `lowbit.runtime.configure()` sets them (the CLI calls it).

    The returned records are the methods' own (with their measured `error`), held compactly in
    lowbit's packed layout, never read back out of a kernel's layout.
    """
    if calib_dtype == "auto":
        calib_dtype = compute_dtype()
    arch = arch_for(model)
    plan = recipe.plan(model, arch)
    if arch.head in plan:
        untie_head(model, arch)
    blocks = blocks_of(model, arch)
    # swapped layers are read back from their QuantLinear on access, not kept twice
    qweights = QuantizedLayers()
    inputs = None
    if method.needs_calibration:
        if calib_ids is None or calib_ids.numel() == 0:
            raise LowbitError(f"method {recipe.method!r} needs calibration text; none was given")
        inputs, block_kwargs = capture_first_block_inputs(model, arch, calib_ids, dtype=calib_dtype)
    start = 0
    fp = None
    if state_dir is not None and inputs is not None:
        fp = fingerprint(recipe, calib_ids, model, extra=f"{calib_dtype}|{method.fingerprint()}")
        state = load_state(state_dir, fp)
        if state is not None:
            start = state["block"] + 1
            for i in range(start):
                materialize_block(model, i)
            for name, err in state["layer_errors"].items():
                if name in state["qweights"]:
                    state["qweights"][name].error = err
            _install(model, state["qweights"], swap)
            qweights.add(state["qweights"])
            inputs = BlockInputs(state["hidden"], inputs.kwargs)
    park(model, arch.embed)  # a lazy model's embeddings wait on disk until the blocks are done
    try:
        bar = tqdm(range(start, len(blocks)), desc=f"{recipe.method} blocks", disable=not progress, unit="block",
                   initial=start, total=len(blocks))
        for i in bar:
            prefix = f"{arch.blocks}.{i}"
            materialize_block(model, i)
            block = blocks[i]
            check_finite(model, [n for n in plan if n.startswith(prefix + ".")])
            if inputs is not None:  # returns with the block's Linears swapped when `swap`
                inputs = BlockInputs(inputs.hidden, block_kwargs[i])
                done, outputs = _calibrated_block(method, block, prefix, arch, plan, inputs, calib_dtype,
                                                  swap_into=model if swap else None)
                inputs = BlockInputs(outputs, inputs.kwargs)
            else:
                done = {f"{prefix}.{n}": _quantize_one(method, f"{prefix}.{n}", get_module(block, n), plan[f"{prefix}.{n}"],
                                                       None, write_back=not swap)
                        for n in arch.linears if f"{prefix}.{n}" in plan}
                if swap:
                    swap_quantized(model, done)
            qweights.add(done)
            if fp is not None:
                save_state(state_dir, i, fp, done, inputs.hidden,
                           {n: qw.error for n, qw in qweights.items() if qw.error is not None})
            del done
            release_free_memory()  # the block's activations and fp32 weights are gone: return their pages
    finally:
        unpark(model)
    rest = [name for name in plan if name not in qweights]  # lm_head and anything outside the blocks
    check_finite(model, rest)
    done = {name: _quantize_one(method, name, get_module(model, name), plan[name], None, write_back=not swap)
            for name in rest}
    if swap:
        swap_quantized(model, done)
    qweights.add(done)
    if recipe.embed_spec is not None:
        qweights.add({arch.embed: _quantize_embedding(model, arch.embed, recipe.embed_spec, swap)})
    return qweights


def _quantize_embedding(model, name: str, spec, swap: bool) -> QuantizedWeight:
    """The input embedding's int8 table, round to nearest (as llama.cpp's Q8_0 token_embd); in
    place as a QuantEmbedding, or its dequantized values written back."""
    from lowbit.nn.quant_embedding import QuantEmbedding, quantize_embedding

    embed = get_module(model, name)
    qw = quantize_embedding(embed, spec, name)
    if swap:
        from lowbit.nn.replace import replace_linear

        replace_linear(model, name, QuantEmbedding.from_quantized(qw, embed.padding_idx, embed.weight.dtype, name))
    else:
        embed.weight.data.copy_(qw.dequantize(embed.weight.dtype))
    return qw


class QuantizedLayers(MutableMapping):
    """{name: QuantizedWeight}: the records of a quantized model, held bit-packed (lowbit's file
    layout: 4-bit codes take half a byte) and unpacked on access, bit-identical. Each access gives
    a fresh record: to change one, assign it back (`layers[name] = record`)."""

    def __init__(self):
        self._held: dict[str, tuple] = {}

    def add(self, qweights: dict[str, QuantizedWeight]) -> None:
        from lowbit.export.lowbit import layer_tensors

        for name, qw in qweights.items():
            self._held[name] = (layer_tensors(name, qw), qw.spec, qw.shape, qw.error)

    def __getitem__(self, name: str) -> QuantizedWeight:
        from lowbit.export.lowbit import read_layer

        tensors, spec, shape, error = self._held[name]
        return read_layer(tensors, name, spec, shape, error)

    def __setitem__(self, name: str, qw: QuantizedWeight) -> None:
        self.add({name: qw})

    def __delitem__(self, name: str) -> None:
        del self._held[name]

    def packed(self, name: str) -> dict[str, torch.Tensor]:
        """The layer's tensors as lowbit's file holds them (what `export.lowbit.layer_tensors` gives)."""
        return self._held[name][0]

    def __iter__(self):
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)


def _install(model, qweights: dict[str, QuantizedWeight], swap: bool) -> None:
    """Put resumed layers in place: packed, or their dequantized weights."""
    if swap:
        swap_quantized(model, qweights)
        return
    for name, qw in qweights.items():
        lin = get_module(model, name)
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype))


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
