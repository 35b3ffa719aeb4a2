"""Builds lowbit's CPU kernels (csrc/) as the extension lowbit._cpu; metadata lives in pyproject.toml.

Needs torch at build time: install with `pip install --no-build-isolation -e .` (the Makefile does).
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ISA = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vbmi", "-mavx512bf16", "-mavx512vnni", "-mfma", "-mf16c"]

setup(
    ext_modules=[CppExtension("lowbit._cpu", ["csrc/qmatmul.cpp", "csrc/decoder.cpp", "csrc/int8.cpp", "csrc/qgemm_i8.cpp"], depends=["csrc/gemv.h"],
                              extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp", *ISA], extra_link_args=["-fopenmp"]),
                 # no global ISA flags: its loops pick AVX2 at run time, so it imports on any x86-64 CPU
                 CppExtension("lowbit._kv_scores", ["csrc/kv_scores.cpp"],
                              extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
)
