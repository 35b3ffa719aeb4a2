"""The candidate options of a mixed-precision plan: bits x group size, as QuantSpecs; or the
GGUF types llama.cpp stores (`gguf_options`), each with its exact bits per weight."""

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
    bits_per_weight: float | None = None  # fixed storage (a GGUF type's block bytes); None: lowbit's checkpoint

    def fits(self, in_features: int) -> bool:
        if self.spec.superblock is not None and in_features % self.spec.superblock:
            return False
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


GGUF_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def gguf_options(types=GGUF_TYPES) -> tuple[Option, ...]:
    """One option per GGUF type: the record spec that maps onto its blocks one to one (GPTQ
    quantizes onto that grid) and the type's exact bits per weight (block bytes x 8 / block).
    A layer takes the types whose block divides its rows (K-types: multiples of 256), i.e. what
    llama.cpp can store for that shape; named by the type."""
    from lowbit.export.gguf_blocks import LAYOUTS

    bad = [t for t in types if t not in LAYOUTS]
    if bad or not types:
        raise LowbitError(f"GGUF option types {', '.join(bad) or '(none)'}: choose from {', '.join(LAYOUTS)}")
    return tuple(Option(t, LAYOUTS[t].spec, LAYOUTS[t].bits_per_weight) for t in dict.fromkeys(types))
