"""Put LoRA adapters on a model: pick the target Linears (names or a regex, peft's rules), quantize
the decoder blocks' Linears to the 4-bit base (QLoRA) or keep them dense (LoRA), freeze the rest.

peft's matching: a list of names matches a module whose name equals one of them or ends with
"." + one of them; a single string is a regular expression the whole module name must match.
The output head is never a target. A lazily loaded model (`load_model(..., lazy=True)`) is
quantized block by block, so the full-precision weights are never resident at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.cpu_features import compute_dtype
from lowbit.errors import LowbitError
from lowbit.models.arch import arch_for, blocks_of
from lowbit.models.lazy import materialize_block
from lowbit.qlora.linear4bit import Linear4bit
from lowbit.qlora.loftq import loftq
from lowbit.qlora.lora import LoraLinear
from lowbit.qlora.storage import QUANT_TYPES

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = ("zero", "loftq")


@dataclass(frozen=True)
class LoraConfig:
    """r, alpha, dropout: the adapters; targets: module names (or suffixes) or one regex string;
    quant_type: "nf4"/"fp4" for a 4-bit base (QLoRA), None for a dense base (plain LoRA);
    init: "zero" (B = 0, peft's default) or "loftq" (A, B from the quantization residual)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] | str = DEFAULT_TARGETS
    quant_type: str | None = "nf4"
    double_quant: bool = True
    init: str = "zero"
    gradient_checkpointing: bool = False
    seed: int = 0  # of the adapters' random init (A)
    loftq_iters: int = 5

    def __post_init__(self):
        if self.r < 1:
            raise LowbitError(f"LoRA rank r={self.r} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise LowbitError(f"LoRA dropout={self.dropout} must lie in [0, 1)")
        if self.quant_type is not None and self.quant_type not in QUANT_TYPES:
            raise LowbitError(f"quant_type {self.quant_type!r}: use one of {', '.join(QUANT_TYPES)} (or none for LoRA)")
        if self.init not in INITS:
            raise LowbitError(f"init {self.init!r}: use one of {', '.join(INITS)}")
        if self.init == "loftq" and self.quant_type is None:
            raise LowbitError("init=loftq starts the adapters from the quantization residual; it needs a 4-bit base")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets) if not isinstance(self.targets, str) else self.targets
        return d


@dataclass
class Adapted:
    """A model with adapters: the module, its config, the adapted module names and the base model's
    fingerprint (checkpoints refuse to resume onto another model)."""

    model: nn.Module
    config: LoraConfig
    targets: list[str]
    fingerprint: str
    base_name: str = ""
    meta: dict = field(default_factory=dict)

    def lora_modules(self) -> dict[str, LoraLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLinear)}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def candidate_linears(model: nn.Module) -> dict[str, nn.Linear]:
    head = arch_for(model).head if getattr(model.config, "model_type", None) else "lm_head"
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head}


def match_targets(names: list[str], targets: tuple[str, ...] | str) -> list[str]:
    """The names `targets` selects (peft's rules); a target that selects nothing is an error listing
    the candidates."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise LowbitError(f"target modules regex {targets!r} is not a valid regular expression ({e})") from None
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen:
            raise LowbitError(f"target modules regex {targets!r} matches no Linear of the model; candidates: "
                              f"{', '.join(short)} (full names like {names[0] if names else '-'})")
        return chosen
    if not targets:
        raise LowbitError(f"no target modules given; candidates: {', '.join(short)}")
    chosen = []
    for t in targets:
        hit = [n for n in names if n == t or n.endswith("." + t)]
        if not hit:
            raise LowbitError(f"target module {t!r} is not a Linear of the model; candidates: {', '.join(short)} "
                              "(or full names, or one regex)")
        chosen += hit
    return [n for n in names if n in set(chosen)]


def fingerprint(model: nn.Module) -> str:
    """A hash of the base model: its config and a sample of its embedding weights."""
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache")}
    emb = model.get_input_embeddings().weight
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    if emb.device.type != "meta":
        h.update(emb.detach()[:8].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _block_prefixes(model) -> list[str]:
    try:
        arch = arch_for(model)
        return [f"{arch.blocks}.{i}." for i in range(len(blocks_of(model, arch)))]
    except LowbitError:
        return [""]


def adapt(model: nn.Module, config: LoraConfig = LoraConfig(), base_name: str = "") -> Adapted:
    """Add adapters to `model` in place (see module docstring) and return the Adapted model."""
    linears = candidate_linears(model)
    chosen = match_targets(list(linears), config.targets)
    for n in chosen:
        lin = linears[n]
        if config.r > min(lin.in_features, lin.out_features):
            raise LowbitError(f"LoRA rank r={config.r} is larger than {n} ({lin.out_features}x{lin.in_features}); "
                              f"use r <= {min(lin.in_features, lin.out_features)}")
    shapes = {n: (m.in_features, m.out_features) for n, m in linears.items()}
    del linears, lin  # the modules get their weights block by block (lazy); keep no reference to them
    fp = fingerprint(model)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen_set = set(chosen)
    qlora = config.quant_type is not None
    compute = compute_dtype() if qlora else torch.float32  # bf16 where this CPU multiplies it natively
    prefixes = _block_prefixes(model)
    gen = torch.Generator().manual_seed(config.seed)
    for i, prefix in enumerate(tqdm(prefixes, desc="4-bit base + adapters" if qlora else "adapters", leave=False)):
        if prefix:
            materialize_block(model, i)
        for name in [n for n in shapes if n.startswith(prefix)]:
            lin = model.get_submodule(name)
            base, product = lin, None
            if qlora and config.init == "loftq" and name in chosen_set:
                packed, *product = loftq(lin.weight, config.r, config.quant_type, config.double_quant,
                                         config.loftq_iters)
                base = Linear4bit(packed, lin.bias, name)
                _set(model, name, base)
            elif qlora:
                base = Linear4bit.from_linear(lin, config.quant_type, config.double_quant, name=name)
                _set(model, name, base)
            del lin
            if name in chosen_set:
                lora = LoraLinear(base, *shapes[name], config.r, config.alpha,
                                  config.dropout, compute, gen)
                if product is not None:
                    lora.set_product(*product)
                _set(model, name, lora)
        if qlora and prefix:
            model.get_submodule(prefix[:-1]).to(compute)  # norms; adapters are made fp32 below
    if qlora:
        model.to(compute)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.float().requires_grad_(True)
            m.lora_B.float().requires_grad_(True)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    log.info("adapters on %d Linears (r=%d), %s base", len(chosen), config.r,
             f"{config.quant_type} 4-bit" if qlora else "dense")
    return Adapted(model, config, chosen, fp, base_name)
