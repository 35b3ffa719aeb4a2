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


# ---- activations: the input / output side of a layer scheme ---------------------------------
ACT_GRANULARITIES = ("tensor", "token", "channel")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")


@dataclass(frozen=True)
class ActSpec:
    """How a layer's activations are quantized (int8 unless `bits` says otherwise).

    dynamic: scales are computed from each input at run time (granularity "token": one scale per
    row of the flattened input, or "tensor"); static: scales fixed by calibration (`observer`, with
    granularity "tensor" or "channel" — one per input feature / conv channel). Symmetric int8 is
    [-127, 127] (the narrow range, so a sign flip is exact and int8 x int8 sums stay in int32);
    asymmetric is uint8 [0, 255] with an integer zero point.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "token"
    dynamic: bool = True
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.granularity not in ACT_GRANULARITIES:
            raise LowbitError(f"ActSpec.granularity={self.granularity!r} is unknown; choose one of {ACT_GRANULARITIES}")
        if self.observer not in OBSERVERS:
            raise LowbitError(f"ActSpec.observer={self.observer!r} is unknown; choose one of {OBSERVERS}")
        if not 2 <= int(self.bits) <= 8:
            raise LowbitError(f"ActSpec.bits={self.bits} is outside 2..8")
        if not self.dynamic and self.granularity == "token":
            raise LowbitError("a static activation spec has fixed scales: granularity 'tensor' or 'channel', "
                              "not 'token'")
        if self.dynamic and self.granularity == "channel":
            raise LowbitError("a dynamic activation spec quantizes per 'token' or per 'tensor'")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + 1 if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def as_quant_spec(self) -> QuantSpec:
        """The QuantSpec with the same range arithmetic (float32 scales; codes one step wider on the
        negative side, which activations never reach: callers clamp to [qmin, qmax])."""
        gran = "channel" if self.granularity in ("token", "channel") else "tensor"
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity=gran, scale_dtype="float32")

    def describe(self) -> str:
        kind = "dynamic" if self.dynamic else f"static {self.observer}"
        return f"a{self.bits} {'sym' if self.symmetric else 'asym'} per-{self.granularity} {kind}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ActSpec":
        unknown = set(d) - set(ACT_FIELDS)
        if unknown:
            raise LowbitError(f"unknown activation spec keys {sorted(unknown)}; known: {ACT_FIELDS}")
        return cls(**d)


ACT_FIELDS = ("bits", "symmetric", "granularity", "dynamic", "observer")


@dataclass(frozen=True)
class LayerScheme:
    """What one module gets: a weight spec, optionally an input-activation spec and an output spec
    (compressed-tensors' (weights, input_activations, output_activations)). Weight-only is
    `input=None`, the case every weight method and QuantLinear handles."""

    weight: QuantSpec
    input: ActSpec | None = None
    output: ActSpec | None = None

    @property
    def weight_only(self) -> bool:
        return self.input is None and self.output is None

    def describe(self) -> str:
        parts = [f"W {self.weight.describe()}"]
        if self.input is not None:
            parts.append(f"in {self.input.describe()}")
        if self.output is not None:
            parts.append(f"out {self.output.describe()}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"weight": self.weight.to_dict(), "input": None if self.input is None else self.input.to_dict(),
                "output": None if self.output is None else self.output.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerScheme":
        def act(v):
            return None if v is None else ActSpec.from_dict(v)

        return cls(QuantSpec.from_dict(d["weight"]), act(d.get("input")), act(d.get("output")))


W8 = QuantSpec(bits=8, symmetric=True, granularity="channel", scale_dtype="float32")
SCHEMES: dict[str, LayerScheme] = {
    "w8a8-dynamic": LayerScheme(W8, ActSpec(granularity="token", dynamic=True)),
    "w8a8-static": LayerScheme(W8, ActSpec(granularity="tensor", dynamic=False)),
    "w4a8": LayerScheme(QuantSpec(bits=4, symmetric=True, granularity="channel", scale_dtype="float32"),
                        ActSpec(granularity="token", dynamic=True)),
}


def scheme(name: str, observer: str | None = None) -> LayerScheme:
    """A named scheme (`SCHEMES`); `observer` replaces a static input spec's observer."""
    try:
        s = SCHEMES[name.lower()]
    except KeyError:
        raise LowbitError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None
    if observer is not None and s.input is not None:
        if s.input.dynamic:
            raise LowbitError(f"--observer {observer} applies to static schemes; {name} is dynamic")
        from dataclasses import replace

        s = replace(s, input=replace(s.input, observer=observer))
    return s
