"""QuantSpec: the numerics of one quantized tensor, shared by PTQ, QAT, observers and export."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowbit.errors import LowbitError

DTYPES = ("int", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
GRANULARITIES = ("tensor", "channel", "group", "token")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a 2-D tensor [rows, cols] (a Linear weight is [out_features, in_features]).

    granularity: "tensor" (one scale), "channel" (one per row), "token" (one per row of an
    activation, same arithmetic as "channel"), "group" (one per row per `group_size` columns).
    Codebook dtypes (nf4, fp4) are symmetric absmax-scaled; fp8 uses torch's float8 dtypes.
    Asymmetric zero points are integer codes by default, with the range widened to include 0 (so 0
    is exact, as GPTQ / AutoAWQ layouts require); `integer_zero=False` keeps z = -min/s as a float,
    so a group's min and max are both exact (llama.cpp's Q4_1, HQQ, torch's int4 kernel). Measured
    on SmolLM2 (bench/rtn_quality.py): integer zeros win at 3 bits, float zeros reproduce Q4_1.

    scale_dtype: how scales (and float zero points) are stored; float16 by default, as every
    consumer format stores them. Methods quantize against the rounded values (`core.qparams.
    round_params`), so what is saved is exactly what was optimised.

    scaled_zero (asymmetric int only): the zero is stored already multiplied by the scale, as the
    offset the dequantization subtracts: w = q·s − zero (a float; llama.cpp's Q4_1/Q5_1 store
    −zero as the block minimum, its K-quants store zero as dmin·m). Same grid as a float zero
    point z = zero/s, but the stored numbers and the arithmetic are the consumer's, bit for bit.

    superblock / scale_bits (double-quantized parameters, llama.cpp's K-quants): every
    `superblock` columns share one float16 factor d, and each group's scale is d times an integer
    multiplier of `scale_bits` bits (unsigned 0..2^b-1 for asymmetric specs, whose zero offsets
    get their own float16 factor and multipliers; 1..2^(b-1)-1 for symmetric ones, as Q6_K's int8
    scales). The record then holds the products d·multiplier, exact in float32: such specs need
    scale_dtype="float32" and are rounded onto their grid by `core.qparams.round_params`.
    """

    bits: int = 4
    dtype: str = "int"
    symmetric: bool = True
    granularity: str = "group"
    group_size: int | None = 64
    integer_zero: bool = True
    scale_dtype: str = "float16"
    scaled_zero: bool = False
    superblock: int | None = None
    scale_bits: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise LowbitError(f"QuantSpec.dtype={self.dtype!r} is unknown; choose one of {DTYPES}")
        if self.granularity not in GRANULARITIES:
            raise LowbitError(
                f"QuantSpec.granularity={self.granularity!r} is unknown; choose one of {GRANULARITIES}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"QuantSpec.scale_dtype={self.scale_dtype!r} is unknown; choose one of {SCALE_DTYPES}")
        if self.dtype == "int" and not (2 <= int(self.bits) <= 8):
            raise LowbitError(f"bits={self.bits} is outside 2..8; lowbit's integer formats take 2 to 8 bits")
        if self.dtype in ("nf4", "fp4") and self.bits != 4:
            raise LowbitError(f"dtype={self.dtype} is a 4-bit codebook; got bits={self.bits}")
        if self.dtype.startswith("fp8") and self.bits != 8:
            raise LowbitError(f"dtype={self.dtype} is 8-bit; got bits={self.bits}")
        if self.dtype != "int" and not self.symmetric:
            raise LowbitError(f"dtype={self.dtype} is symmetric only; drop --asym")
        if self.symmetric or self.dtype != "int":
            object.__setattr__(self, "integer_zero", True)  # the zero point is 0 anyway
        if self.scaled_zero:
            if self.symmetric or self.dtype != "int":
                raise LowbitError("scaled_zero=True needs an asymmetric integer spec (--asym)")
            object.__setattr__(self, "integer_zero", False)
        if (self.superblock is None) != (self.scale_bits is None):
            raise LowbitError("superblock and scale_bits go together (e.g. superblock=256, scale_bits=6)")
        if self.superblock is not None:
            if self.dtype != "int" or self.granularity != "group" or not self.group_size:
                raise LowbitError("superblock needs an integer spec with granularity='group'")
            if self.superblock % self.group_size or not 2 <= int(self.scale_bits) <= 8:
                raise LowbitError(f"superblock={self.superblock} must be a multiple of group_size={self.group_size} "
                                  f"and scale_bits={self.scale_bits} in 2..8")
            if self.scale_dtype != "float32" or not (self.symmetric or self.scaled_zero):
                raise LowbitError("a superblock spec holds its scales as float32 products (scale_dtype='float32') "
                                  "and, when asymmetric, its zero as a scaled offset (scaled_zero=True)")
        if self.granularity == "group":
            if self.group_size is None or self.group_size < 1:
                raise LowbitError(f"group_size={self.group_size} must be a positive integer for granularity='group'")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def is_codebook(self) -> bool:
        return self.dtype in ("nf4", "fp4")

    def groups(self, cols: int) -> int:
        """Number of scale columns for a tensor with `cols` columns."""
        if self.granularity == "group":
            return cols // self.group_size
        return 1

    @property
    def scale_levels(self) -> int | None:
        """Largest integer multiplier of a superblock spec's scales (None without superblocks)."""
        if self.scale_bits is None:
            return None
        return 2 ** (self.scale_bits - 1) - 1 if self.symmetric else 2**self.scale_bits - 1

    def check_shape(self, rows: int, cols: int, name: str = "tensor") -> None:
        if self.superblock is not None and cols % self.superblock:
            raise LowbitError(f"{name}: its input dimension {cols} is not a multiple of superblock={self.superblock}")
        if self.granularity == "group" and cols % self.group_size:
            divisors = [g for g in (32, 64, 128, 256) if cols % g == 0]
            raise LowbitError(
                f"group_size={self.group_size} does not divide the input dimension {cols} of {name}; "
                f"group sizes that divide it: {divisors or 'none of 32/64/128/256'}"
            )

    @property
    def torch_scale_dtype(self):
        import torch

        return getattr(torch, self.scale_dtype)

    def describe(self) -> str:
        if self.dtype != "int":
            base = self.dtype.upper()
        else:
            zp = "asym-min" if self.scaled_zero else ("asym" if self.integer_zero else "asym-fz")
            base = f"int{self.bits} {'sym' if self.symmetric else zp}"
        tail = "" if self.scale_dtype == "float16" else f" {self.scale_dtype} scales"
        if self.superblock is not None:
            tail = f" sb{self.superblock}x{self.scale_bits}b"
        if self.granularity == "group":
            return f"{base} g{self.group_size}{tail}"
        return f"{base} per-{self.granularity}{tail}"

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("scaled_zero", "superblock", "scale_bits"):  # written only when used (older readers)
            if not d[k]:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**{k: d[k] for k in FIELDS if k in d})


FIELDS = ("bits", "dtype", "symmetric", "granularity", "group_size", "integer_zero", "scale_dtype", "scaled_zero",
          "superblock", "scale_bits")

PRESETS: dict[str, QuantSpec] = {
    "W8": QuantSpec(bits=8, symmetric=True, granularity="channel"),
    "W8G128": QuantSpec(bits=8, symmetric=True, granularity="group", group_size=128),
    "W4": QuantSpec(bits=4, symmetric=True, granularity="channel"),
    "W4G32": QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32),
    "W4G64": QuantSpec(bits=4, symmetric=True, granularity="group", group_size=64),
    "W4G128": QuantSpec(bits=4, symmetric=True, granularity="group", group_size=128),
    "W4G64A": QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64),
    "W3G64": QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64),
    "W2G64": QuantSpec(bits=2, symmetric=False, granularity="group", group_size=64),
    "NF4": QuantSpec(bits=4, dtype="nf4", granularity="group", group_size=64),
    "FP4": QuantSpec(bits=4, dtype="fp4", granularity="group", group_size=32),
    "FP8": QuantSpec(bits=8, dtype="fp8_e4m3", granularity="channel"),
    "FP8_E5M2": QuantSpec(bits=8, dtype="fp8_e5m2", granularity="channel"),
    "A8": QuantSpec(bits=8, symmetric=True, granularity="token"),
}


def preset(name: str) -> QuantSpec:
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise LowbitError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
