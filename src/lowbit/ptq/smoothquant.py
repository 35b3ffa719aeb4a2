"""SmoothQuant: migrate activation outliers into the weights, s_j = max|X_j|^α / max|W_j|^(1-α),
X / s folded into the preceding norm's weight (and bias), W · s into the Linears that read it.
The model computes the same function (up to float rounding); int8 activations lose less."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.ptq.calibrate import watch_inputs
from lowbit.ptq.smooth_search import sample_inputs, search_alpha

EPS = 1e-5


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per input channel s = a^α / w^(1-α) (1 where a channel never fired or its weights are 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha={alpha} must be in [0, 1]")
    a = act_absmax.float()
    w = weight_absmax.float()
    s = a.clamp_min(EPS).pow(alpha) / w.clamp_min(EPS).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s.clamp_min(EPS), torch.ones_like(s))


# which activation a smoothing pair smooths, named by the Linears that read it
KINDS = {"q_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "down_proj": "down"}
DEFAULT_KINDS = ("qkv", "gate_up", "down")  # a single alpha: every pair but v -> o


def _check_one(alpha, where: str = "") -> bool:
    if isinstance(alpha, str):
        if alpha != "auto":
            raise LowbitError(f"SmoothQuant alpha{where}={alpha!r}: give a number in [0, 1] or 'auto'")
        return True
    smooth_scales(torch.ones(1), torch.ones(1), alpha)
    return False


def check_alpha(alpha) -> bool:
    """True when some alpha is "auto" (searched per pair); numbers must lie in [0, 1]. A dict
    {kind: alpha} (kinds: qkv, o, gate_up, down) smooths only the kinds it names."""
    if isinstance(alpha, dict):
        if not alpha:
            raise LowbitError("SmoothQuant alphas per mapping: the dict is empty")
        bad = [k for k in alpha if k not in KINDS.values()]
        if bad:
            raise LowbitError(f"SmoothQuant alpha for unknown mapping {bad[0]!r}; mappings: "
                              f"{', '.join(KINDS.values())}")
        return any([_check_one(a, f"[{k}]") for k, a in alpha.items()])
    return _check_one(alpha)


def pair_kind(lins: list[str]) -> str:
    """The mapping a pair belongs to, from the first Linear reading it (q_proj -> "qkv", ...)."""
    short = lins[0].rsplit(".", 1)[-1]
    return KINDS.get(short, short)


def alpha_for(alpha, kind: str, up_down: bool = True):
    """This mapping's alpha (a number or "auto"), None when it is not smoothed."""
    if isinstance(alpha, dict):
        return alpha.get(kind)
    if kind not in DEFAULT_KINDS or (kind == "down" and not up_down):
        return None
    return alpha


def parse_alpha(text: str | None):
    """The CLI's --smoothquant: None, "auto", a number in [0, 1], or alphas per mapping as
    "qkv=0.8,o=0.5,gate_up=0.8,down=auto" (mappings not named are not smoothed)."""
    if text is None:
        return None
    t = text.strip().lower()
    if "=" in t:
        out = {}
        for part in t.split(","):
            k, _, v = part.partition("=")
            out[k.strip()] = parse_alpha(v) if v.strip() else v
        check_alpha(out)
        return out
    if t == "auto":
        return "auto"
    try:
        a = float(t)
    except ValueError:
        raise LowbitError(f"--smoothquant {text!r}: give a number in [0, 1], 'auto', or per mapping "
                          "'qkv=0.8,o=0.5,gate_up=0.8,down=auto'") from None
    check_alpha(a)
    return a


def kv_group_max(x: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """[heads * head_dim] per o_proj input channel -> [kv_heads * head_dim]: the max over the query
    heads that read each kv head (grouped-query attention: query head h reads kv head
    h // (heads / kv_heads), as Hugging Face's repeat_kv lays them out)."""
    return x.reshape(kv_heads, -1, head_dim).amax(dim=1).reshape(-1)


def kv_expand(s: torch.Tensor, rep: int, head_dim: int) -> torch.Tensor:
    """[kv_heads * head_dim] -> [kv_heads * rep * head_dim]: each kv channel's value for every
    query head reading it (the inverse layout of kv_group_max)."""
    return s.reshape(-1, 1, head_dim).expand(-1, rep, -1).reshape(-1)


def pair_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                kv: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s for the previous op's output, s for the reading Linears' input columns). kv = (kv_heads,
    head_dim) for v_proj -> o_proj under grouped-query attention: one s per kv channel, shared by
    every query head reading it."""
    if kv is None:
        s = smooth_scales(act_absmax, weight_absmax, alpha)
        return s, s
    n_kv, hd = kv
    s = smooth_scales(kv_group_max(act_absmax, n_kv, hd), kv_group_max(weight_absmax, n_kv, hd), alpha)
    return s, kv_expand(s, act_absmax.numel() // (n_kv * hd), hd)


def fold_smoothing(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0,
                   s_in: torch.Tensor | None = None) -> None:
    """In place: norm(x) / s and W · s (norm_offset 1: a norm that scales by 1 + weight, as Gemma's).
    `norm` may be a Linear whose output feeds the others through an elementwise product (up_proj
    before down_proj) or through attention (v_proj before o_proj): its output rows are divided by s.
    s_in: the reading Linears' column scales when they differ in layout from s (grouped-query v -> o)."""
    w = norm.weight.data
    ct = torch.promote_types(w.dtype, torch.float32)  # float64 models fold in float64
    s_in = (s if s_in is None else s_in).to(ct)
    s = s.to(ct)
    if isinstance(norm, nn.Linear):
        norm.weight.data = (w.to(ct) / s[:, None]).to(w.dtype)
    else:
        norm.weight.data = (((w.to(ct) + norm_offset) / s) - norm_offset).to(w.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.data.to(ct) / s).to(norm.bias.dtype)
    for lin in linears:
        lin.weight.data = (lin.weight.data.to(ct) * s_in[None, :]).to(lin.weight.dtype)


def llm_pairs(model, up_down: bool = True, v_o: bool = False) -> list[tuple[str, list[str]]]:
    """(norm, Linears reading it) of every decoder block, from the architecture table's smoothing
    pairs whose first member is a norm, and (with up_down) up_proj -> down_proj: down_proj reads
    act(gate) * up, so dividing up's output rows by s divides its input; with v_o also
    v_proj -> o_proj (attention is linear in V per head; under grouped-query attention the scales
    are shared per kv head, `pair_scales`)."""
    from lowbit.models.arch import arch_for, blocks_of

    arch = arch_for(model)
    pairs = []
    for i, _ in enumerate(blocks_of(model, arch)):
        for prev, lins in arch.smooth:
            if prev in arch.linears and not ((up_down and prev.endswith("up_proj"))
                                             or (v_o and prev.endswith("v_proj"))):
                continue
            p = f"{arch.blocks}.{i}"
            pairs.append((f"{p}.{prev}", [f"{p}.{n}" for n in lins]))
    return pairs


def kv_layout(model: nn.Module, prev: nn.Module, lin: nn.Module, name: str) -> tuple[int, int] | None:
    """(kv_heads, head_dim) when `prev` is a Linear whose outputs are fewer than `lin`'s inputs
    (v_proj -> o_proj under grouped-query attention), else None."""
    if not isinstance(prev, nn.Linear) or prev.out_features == lin.in_features:
        return None
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hd = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", 0) // heads if heads else None)
    if not hd or prev.out_features % hd or lin.in_features % prev.out_features:
        raise LowbitError(f"{name}: its {prev.out_features} outputs feed {lin.in_features} inputs; smoothing it "
                          "needs the model config's head_dim / num_attention_heads (grouped-query attention)")
    return prev.out_features // hd, hd


def input_absmax(model: nn.Module, names: list[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of each named module over the batches."""
    seen: dict[str, torch.Tensor] = {}

    def on_input(name, x):
        if not bool(torch.isfinite(x).all()):
            raise LowbitError(f"{name}: NaN/Inf activations during SmoothQuant calibration")
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        seen[name] = m if name not in seen else torch.maximum(seen[name], m)

    watch_inputs(model, names, batches, on_input)
    return seen


def smooth(model: nn.Module, batches: Iterable, alpha=0.5,
           pairs: list[tuple[str, list[str]]] | None = None, norm_offset: float | None = None,
           up_down: bool = True, dynamic: bool = True, alphas: dict | None = None) -> dict[str, torch.Tensor]:
    """Smooth `model` in place; returns {norm name: s}. `pairs` default to a known LLM's norms
    (and up -> down, v -> o). alpha: a number, "auto", or a dict {mapping: alpha} over
    qkv / o / gate_up / down (a single alpha smooths qkv, gate_up and down; a dict only what it
    names). "auto": searched per pair on the calibration batches (`smooth_search`) for int8
    activations quantized per token (`dynamic`) or per tensor (static); the chosen alphas are
    written into the dict `alphas` when given."""
    check_alpha(alpha)
    if pairs is None:
        pairs = llm_pairs(model, up_down, v_o=True)
        if norm_offset is None:
            from lowbit.models.arch import arch_for

            norm_offset = arch_for(model).norm_offset
    todo = [(n, lins, alpha_for(alpha, pair_kind(lins), up_down)) for n, lins in pairs]
    todo = [t for t in todo if t[2] is not None]
    if not todo:
        raise LowbitError(f"SmoothQuant alpha {alpha!r} names no smoothing pair of {type(model).__name__}")
    batches = list(batches)
    stats = input_absmax(model, [lins[0] for _, lins, _ in todo], batches)
    auto = [lins[0] for _, lins, a in todo if a == "auto"]
    samples = sample_inputs(model, auto, batches) if auto else {}
    out = {}
    for norm_name, lins, a in todo:
        if lins[0] not in stats:
            raise LowbitError(f"{lins[0]}: no calibration data reached it; cannot smooth {norm_name}")
        mods = [model.get_submodule(n) for n in lins]
        prev = model.get_submodule(norm_name)
        kv = kv_layout(model, prev, mods[0], norm_name)
        w_absmax = torch.cat([m.weight.detach().float() for m in mods]).abs().amax(dim=0)
        if a == "auto":
            a, _ = search_alpha(samples[lins[0]], [m.weight.detach().float() for m in mods], stats[lins[0]], dynamic,
                                scales=lambda al, am=stats[lins[0]], wm=w_absmax, kv=kv: pair_scales(am, wm, al, kv)[1])
            if alphas is not None:
                alphas[norm_name] = a
        s, s_in = pair_scales(stats[lins[0]], w_absmax, a, kv)
        fold_smoothing(prev, mods, s, norm_offset or 0.0, s_in)
        out[norm_name] = s
    return out
