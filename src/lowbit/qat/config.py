"""QATConfig: which modules train with fake quantization, at which scheme, with which ranges.

The same LayerScheme drives `prepare_qat` (fake quant), `convert_qat` (the real kernels) and the
PTQ paths, so training and serving numerics cannot drift (torchao's idea)."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.name_rules import check_patterns, setting_for
from lowbit.spec import PRESETS, SCHEMES, LayerScheme

WEIGHT_RANGES = ("lsq", "minmax")
ACT_RANGES = ("lsq", "observer")


def check_scheme(s: LayerScheme, where: str = "QATConfig") -> None:
    """Refuse a scheme no converted kernel runs (named, with the fix)."""
    w = s.weight
    if w.dtype != "int" or w.scaled_zero or w.superblock is not None:
        raise LowbitError(f"{where}: QAT trains plain integer weights (int2..int8, sym or asym, per channel or "
                          f"group); {w.describe()} is not one")
    if s.output is not None:
        raise LowbitError(f"{where}: output activation specs are not trained by QAT; drop the output spec")
    if s.input is not None:
        if not w.symmetric or w.granularity != "channel":
            raise LowbitError(f"{where}: with activation quantization the int8 kernels take symmetric per-channel "
                              f"weights; got {w.describe()} (use a weight-only scheme such as w4g64, or w4a8)")
        if not s.input.dynamic and s.input.granularity != "tensor":
            raise LowbitError(f"{where}: static activation ranges are trained per tensor; got "
                              f"{s.input.describe()}")


def qat_scheme(name: str) -> LayerScheme:
    """A scheme by name: a weight preset (w3g64, w2g64, w4g64, w8, ...: weight-only) or an
    activation scheme of `lowbit.spec.SCHEMES` (w8a8-dynamic, w8a8-static, w4a8)."""
    key = name.strip()
    if key.lower() in SCHEMES:
        s = SCHEMES[key.lower()]
    elif key.upper() in PRESETS:
        s = LayerScheme(PRESETS[key.upper()])
    else:
        presets = ", ".join(p.lower() for p in PRESETS)
        raise LowbitError(f"--scheme {name!r} is unknown; choose a weight preset ({presets}) "
                          f"or an activation scheme ({', '.join(SCHEMES)})")
    check_scheme(s, f"--scheme {name}")
    return s


@dataclass(frozen=True)
class QATConfig:
    """scheme: what every target module gets; ignore / overrides / targets as in PTQConfig (None
    targets = every nn.Linear and groups=1 nn.Conv2d except a model's output embedding);
    fold_bn: fold each BatchNorm2d into its conv first (running statistics; then trained folded);
    weight_range: "lsq" (learned step size, from min-max or a PTQ record) or "minmax" (recomputed
    from the current weights every step, STE); learn_zero: LSQ+ learned zero point (asymmetric);
    act_range: static input ranges "lsq" (learned, from calibration observers) or "observer"
    (calibrated once, fixed)."""

    scheme: LayerScheme
    ignore: tuple[str, ...] = ()
    overrides: tuple[tuple[str, LayerScheme], ...] = ()
    targets: tuple[str, ...] | None = None
    fold_bn: bool = True
    bn_pairs: tuple[tuple[str, str], ...] = ()
    weight_range: str = "lsq"
    learn_zero: bool = False
    act_range: str = "lsq"
    percentile: float = 99.99
    max_values: int = 1 << 21

    def __post_init__(self) -> None:
        check_patterns("QATConfig", (*self.ignore, *(p for p, _ in self.overrides)))
        for s in (self.scheme, *(s for _, s in self.overrides)):
            check_scheme(s)
        if self.weight_range not in WEIGHT_RANGES:
            raise LowbitError(f"QATConfig.weight_range={self.weight_range!r}; choose one of {WEIGHT_RANGES}")
        if self.act_range not in ACT_RANGES:
            raise LowbitError(f"QATConfig.act_range={self.act_range!r}; choose one of {ACT_RANGES}")

    def scheme_for(self, name: str) -> LayerScheme | None:
        return setting_for(name, self.scheme, self.ignore, self.overrides, self.targets)
