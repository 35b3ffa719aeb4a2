"""lowbit's compiled CPU kernels (csrc/qmatmul.cpp, built by the install step as `lowbit._cpu`).

`load()` returns the extension module when it is built and this CPU has every instruction set it is
compiled with (AVX-512 F/BW/VL/DQ/VBMI/BF16/VNNI, FMA, F16C: checked before the import, which
would otherwise die of SIGILL on an AVX2-only CPU); otherwise None, and QuantLinear runs its pure-torch path. Setting
LOWBIT_KERNELS=torch forces the pure-torch path (to compare the two, or to rule the kernels out).
"""

from __future__ import annotations

import functools
import logging
import os

from lowbit.core.cpu_features import this_cpu_flags
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

# the mode numbers of csrc/qmatmul.cpp
MODE_OFFSET, MODE_ZERO, MODE_SCALED_ZERO, MODE_TABLE = 0, 1, 2, 3


# the instruction sets lowbit._cpu is compiled with (setup.py's ISA): the compiler may use any of them
# anywhere in the module, its import included, so a CPU without one of them must not import it at all
ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi", "avx512_bf16", "avx512_vnni", "fma", "f16c")


def missing_isa(flags: set[str] | None) -> list[str]:
    """The instruction sets of ISA_FLAGS this CPU lacks (all of them when its flags are unknown)."""
    return [f for f in ISA_FLAGS if flags is None or f not in flags]


@functools.cache
def _extension():
    flags = this_cpu_flags()
    missing = missing_isa(flags)
    if missing:  # importing the module would execute instructions this CPU does not have (SIGILL)
        what = "cannot tell this CPU's instruction sets" if flags is None else "this CPU lacks " + ", ".join(missing)
        log.warning("%s: lowbit's CPU kernels are not loaded and quantized layers use the slower pure-torch path", what)
        return None
    try:
        from lowbit import _cpu
    except ImportError as e:
        log.warning("lowbit's CPU kernels are not built (%s): quantized layers use the slower pure-torch path; "
                    "reinstall with `pip install --no-build-isolation -e .` (see README)", e)
        return None
    return _cpu  # its own cpu_supported() checks a subset of ISA_FLAGS, already checked above


def load():
    """The kernel module, or None when unavailable or disabled by LOWBIT_KERNELS=torch (asked when a
    layer is built; a layer built for the kernels calls `ext()`)."""
    if os.environ.get("LOWBIT_KERNELS", "").lower() == "torch":
        return None
    return _extension()


def ext():
    """The kernel module for a layer that was built to use it (no environment lookup per call)."""
    return _extension()


@functools.cache
def vnni() -> bool:
    """Whether this CPU runs `qgemm_i8` (AVX-512 VNNI), for layers built on the kernels."""
    ext_ = _extension()
    return ext_ is not None and ext_.vnni_supported()


def mode(spec: QuantSpec) -> int | None:
    """The kernel's dequantization mode for a spec, or None when the kernels do not cover it."""
    if spec.is_codebook:
        return MODE_TABLE if spec.bits == 4 else None
    if spec.dtype != "int":
        return None  # fp8: the pure-torch path
    if spec.symmetric:
        return MODE_OFFSET
    return MODE_SCALED_ZERO if spec.scaled_zero else MODE_ZERO


def covers(spec: QuantSpec, in_features: int, group_size: int | None) -> bool:
    """Whether the compiled kernels run this layout: 1..6 or 8 bits, K a multiple of 64, groups of 32
    or of a multiple of 64 codes (or per channel)."""
    if mode(spec) is None or spec.bits == 7:
        return False
    group = group_size or in_features
    return in_features % 64 == 0 and (group == 32 or group % 64 == 0) and in_features % group == 0
