"""PTQConfig: one object drives prepare -> calibrate -> convert (which modules, which scheme)."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.name_rules import check_patterns, setting_for
from lowbit.spec import LayerScheme, scheme


@dataclass(frozen=True)
class PTQConfig:
    """scheme: what every target module gets; overrides: (regex, scheme), first match wins;
    ignore: regexes of module names kept in float; targets: exact module names (None = every
    nn.Linear and groups=1 nn.Conv2d, except the output embedding of a model that has one);
    fold_bn: fold each BatchNorm2d into the Conv2d before it (in nn.Sequential containers and the
    explicit `bn_pairs` (conv name, bn name)); percentile / max_values: observer settings."""

    scheme: LayerScheme
    ignore: tuple[str, ...] = ()
    overrides: tuple[tuple[str, LayerScheme], ...] = ()
    targets: tuple[str, ...] | None = None
    fold_bn: bool = True
    bn_pairs: tuple[tuple[str, str], ...] = ()
    percentile: float = 99.99
    max_values: int = 1 << 21

    def __post_init__(self) -> None:
        check_patterns("PTQConfig", (*self.ignore, *(p for p, _ in self.overrides)))
        for s in (self.scheme, *(s for _, s in self.overrides)):
            if s.output is not None and s.output.granularity != "tensor":
                raise LowbitError("PTQConfig: an output activation spec is per tensor")
            if s.input is None:
                raise LowbitError("PTQConfig: the scheme needs an input activation spec (weight-only schemes are "
                                  "`lowbit quantize --method ...`)")
        if not 0 < self.percentile <= 100:
            raise LowbitError(f"PTQConfig.percentile={self.percentile} must be in (0, 100]")

    def scheme_for(self, name: str) -> LayerScheme | None:
        return setting_for(name, self.scheme, self.ignore, self.overrides, self.targets)


def ptq_config(name: str = "w8a8-dynamic", observer: str | None = None, **kwargs) -> PTQConfig:
    """A PTQConfig for a named scheme (`lowbit.spec.SCHEMES`), e.g. ptq_config("w8a8-static", "entropy")."""
    return PTQConfig(scheme(name, observer), **kwargs)
