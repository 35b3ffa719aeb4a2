"""prepare(model, config): fold BatchNorm, plan {module: scheme}, attach observers."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lowbit.errors import LowbitError
from lowbit.observers.state import RangeState
from lowbit.ptq.config import PTQConfig
from lowbit.ptq.fold_bn import fold_batchnorm, sequential_pairs
from lowbit.ptq.observe import input_hook, output_hook
from lowbit.spec import LayerScheme

ATTR = "_lowbit_ptq"


@dataclass
class Prepared:
    """What prepare() leaves on the model for calibrate() and convert()."""

    config: PTQConfig
    plan: dict[str, LayerScheme]
    inputs: dict[str, RangeState] = field(default_factory=dict)
    outputs: dict[str, RangeState] = field(default_factory=dict)
    folded: list[tuple[str, str]] = field(default_factory=list)
    handles: list = field(default_factory=list)
    batches: int = 0


def quantizable(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros" and isinstance(
        mod.padding, tuple)


def plan_modules(model: nn.Module, config: PTQConfig) -> dict[str, LayerScheme]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plan = {}
    for name, mod in model.named_modules():
        if not name or not quantizable(mod) or (mod is head and config.targets is None):
            continue
        s = config.scheme_for(name)
        if s is not None:
            plan[name] = s
    if config.targets is not None:
        missing = [t for t in config.targets if t not in plan and not any(
            n == t for n, m in model.named_modules() if quantizable(m))]
        if missing:
            raise LowbitError(f"PTQConfig.targets: {missing[:3]} are not Linear / Conv2d modules of "
                              f"{type(model).__name__}")
    if not plan:
        raise LowbitError(f"{type(model).__name__} has no module the scheme can quantize (nn.Linear, or nn.Conv2d "
                          "with groups=1), or the config's ignore / targets leave none")
    return plan


def prepare(model: nn.Module, config: PTQConfig) -> nn.Module:
    """In place: fold BatchNorm into the convs, plan the modules, attach observers for static
    specs. Returns the model; run `calibrate` (static schemes), then `convert`."""
    if getattr(model, ATTR, None) is not None:
        raise LowbitError(f"{type(model).__name__} is already prepared; convert() it or start from a fresh model")
    model.eval()
    folded = []
    if config.fold_bn:
        folded = fold_batchnorm(model, [*sequential_pairs(model), *config.bn_pairs])
    plan = plan_modules(model, config)
    p = Prepared(config, plan, folded=folded)
    for name, s in plan.items():
        mod = model.get_submodule(name)
        state = None
        if not s.input.dynamic:
            state = p.inputs[name] = RangeState(s.input, name, config.max_values, config.percentile)
        p.handles.append(mod.register_forward_pre_hook(input_hook(state, name)))
        if s.output is not None:
            p.outputs[name] = RangeState(s.output, f"{name} (output)", config.max_values, config.percentile)
            p.handles.append(mod.register_forward_hook(output_hook(p.outputs[name], name)))
    object.__setattr__(model, ATTR, p)  # plain attribute: not a submodule, not in the state dict
    return model


def prepared(model: nn.Module) -> Prepared:
    p = getattr(model, ATTR, None)
    if p is None:
        raise LowbitError(f"{type(model).__name__} is not prepared; call lowbit.ptq.prepare(model, config) first")
    return p
