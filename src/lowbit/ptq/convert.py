"""convert(model): replace each planned module by its int8 kernel, from the observers' ranges."""

from __future__ import annotations

from torch import nn

from lowbit.nn.int8_conv import Int8Conv2d
from lowbit.nn.int8_linear import Int8Linear
from lowbit.nn.replace import replace_linear
from lowbit.ptq.prepare import ATTR, prepared


def convert(model: nn.Module) -> nn.Module:
    """In place; returns the model. Static specs need calibrate() first (an uncalibrated module is
    an error naming it)."""
    p = prepared(model)
    for h in p.handles:
        h.remove()
    p.handles.clear()
    qparams = {name: st.qparams() for name, st in p.inputs.items()}  # every error before any swap
    out_qparams = {name: st.qparams() for name, st in p.outputs.items()}
    for name, s in p.plan.items():
        mod = model.get_submodule(name)
        cls = Int8Conv2d if isinstance(mod, nn.Conv2d) else Int8Linear
        new = cls.from_float(mod, s, qparams.get(name), out_qparams.get(name), name=name)
        replace_linear(model, name, new)
    model.__dict__.pop(ATTR, None)
    model._lowbit_converted = {"plan": {n: s.to_dict() for n, s in p.plan.items()}, "folded": p.folded}
    return model
