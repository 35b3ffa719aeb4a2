"""Per-layer relative output error of a checkpoint's records against the 4^-b rate-distortion bound.

The error is tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) (`algorithms.hessian.output_error`) — the squared output
error of the layer relative to its output's energy, for inputs with second moment H. A uniform
b-bit quantizer of a Gaussian source reaches about 4^-b (the rate-distortion bound's slope: 6 dB
per bit); a layer far above its bound deserves more bits. lowbit's calibrated methods store the
error they measured (inputs from the already-quantized blocks); for other checkpoints it is
measured here, on calibration windows through the original model (its inputs, its weights).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lowbit.algorithms.hessian import output_error
from lowbit.models.arch import arch_for, get_module


def block_linear_names(model) -> list[str]:
    """Full names of the decoder blocks' Linears, in block order."""
    arch = arch_for(model)
    blocks = get_module(model, arch.blocks)
    return [f"{arch.blocks}.{i}.{n}" for i in range(len(blocks)) for n in arch.linears]


def bound(bits: int) -> float:
    return 4.0 ** -bits


@torch.no_grad()
def input_hessians(model, ids: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """{name: Xᵀ X / rows} of every decoder-block Linear's inputs over the [n, seq] windows `ids`;
    Linears reading the same input (q/k/v, gate/up: one of the architecture's sequential groups)
    share one matrix."""
    arch = arch_for(model)
    blocks = get_module(model, arch.blocks)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles, aliases = [], {}
    for i in range(len(blocks)):
        for group in arch.sequential:
            first = f"{arch.blocks}.{i}.{group[0]}"
            aliases.update({f"{arch.blocks}.{i}.{n}": first for n in group})

            def hook(mod, args, name=first):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[name] = x.T @ x if name not in sums else sums[name].add_(x.T @ x)
                rows[name] = rows.get(name, 0) + x.shape[0]
            handles.append(model.get_submodule(first).register_forward_pre_hook(hook))
    try:
        for window in tqdm(ids, desc="layer inputs", disable=not progress, unit="window"):
            model(input_ids=window[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for name, total in sums.items():
        total.div_(rows[name])
    return {name: sums[first] for name, first in aliases.items() if first in sums}


def norms_match(original, tensors: dict, atol: float = 1e-3) -> bool:
    """Whether the checkpoint's 1-D tensors (norm weights) equal the original's: methods that fold
    scales into the norms (AWQ) store weights in another frame than the original's, so their
    records cannot be compared with the original's weights layer by layer."""
    state = original.state_dict()
    for key, value in tensors.items():
        if value.dim() == 1 and key in state and state[key].shape == value.shape:
            if not torch.allclose(state[key].float(), value.float(), atol=atol, rtol=1e-3):
                return False
    return True


def record_summary(layers, names: list[str]) -> dict[str, dict]:
    """{name: {bits_per_weight, count, bits, error}} of the records among `names`, each record read
    once (a lazily read checkpoint unpacks a layer on every access)."""
    out = {}
    for name in names:
        if name in layers:
            qw = layers[name]
            out[name] = {"bits_per_weight": qw.bits_per_weight(), "count": qw.codes.numel(), "bits": qw.spec.bits,
                         "error": None if qw.error is None else float(qw.error)}
    return out


def record_errors(summary: dict[str, dict]) -> dict[str, dict]:
    """{name: {bits, rel_error, bound, source}} from the errors the records hold (`record_summary`)."""
    return {name: {"bits": s["bits"], "rel_error": s["error"], "bound": bound(s["bits"]), "source": "record"}
            for name, s in summary.items() if s["error"] is not None}


@torch.no_grad()
def measured_errors(original, layers, names: list[str], hessians: dict[str, torch.Tensor],
                    progress: bool = False, desc: str = "layer errors") -> dict[str, dict]:
    """{name: {bits, rel_error, bound, source}} measured against the original's weights."""
    out = {}
    for name in tqdm(names, desc=desc, disable=not progress, unit="layer"):
        if name not in layers or name not in hessians:
            continue
        qw = layers[name]
        W = original.get_submodule(name).weight.detach()
        out[name] = {"bits": qw.spec.bits, "rel_error": output_error(W, qw.dequantize(), hessians[name]),
                     "bound": bound(qw.spec.bits), "source": "measured"}
    return out
