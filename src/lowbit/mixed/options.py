"""The candidate options of a mixed-precision plan: bits x group size, as QuantSpecs."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128, 0)  # 0: one scale per output channel
ASYM_BELOW = 4  # 2- and 3-bit options are asymmetric (integer zero points), 4+ symmetric


@dataclass(frozen=True)
class Option:
    """One way to quantize a layer; `name` is its key in measurements and plans."""

    name: str
    spec: QuantSpec

    def fits(self, in_features: int) -> bool:
        return self.spec.granularity != "group" or in_features % self.spec.group_size == 0


def option_spec(bits: int, group: int, symmetric: bool | None = None) -> QuantSpec:
    sym = bits >= ASYM_BELOW if symmetric is None else symmetric
    if group:
        return QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=group)
    return QuantSpec(bits=bits, symmetric=sym, granularity="channel")


def option_name(spec: QuantSpec) -> str:
    g = f"g{spec.group_size}" if spec.granularity == "group" else "ch"
    return f"w{spec.bits}{g}{'s' if spec.symmetric else 'a'}"


def candidate_options(bits=BITS, groups=GROUPS, symmetric: bool | None = None) -> tuple[Option, ...]:
    """Every (bits, group) pair; layers take those whose group divides their input size.
    symmetric: None = asymmetric below `ASYM_BELOW` bits, symmetric from there; True/False: all."""
    bits, groups = tuple(bits), tuple(groups)
    if not bits or not groups:
        raise LowbitError("mixed precision needs at least one bit width and one group size")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise LowbitError(f"option bits {b!r} is outside 2..8")
    for g in groups:
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise LowbitError(f"option group size {g!r} must be a positive integer or 0 (per channel)")
    out = []
    for b in sorted(set(bits)):
        for g in sorted(set(groups), key=lambda g: g or 1 << 30):
            spec = option_spec(b, g, symmetric)
            out.append(Option(option_name(spec), spec))
    return tuple(out)


def parse_list(text: str, what: str) -> tuple[int, ...]:
    """'2,3,4' -> (2, 3, 4) for the CLI's --bits-options / --group-options."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise LowbitError(f"{what} must be comma-separated integers, e.g. 2,3,4; got {text!r}") from None
