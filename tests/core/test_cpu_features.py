"""Picking kernels and compute dtypes by the CPU's instruction sets (core.cpu_features, nn.cpu_kernels)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import cpu_features, int8
from lowbit.nn import cpu_kernels

EPYC_AVX2 = "fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand avx2 bmi1 bmi2"
ZEN4 = EPYC_AVX2 + " avx512f avx512dq avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16 avx512_vpopcntdq"


def _cpuinfo(tmp_path, flags: str):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return str(p)


def test_avx2_only_cpu_gets_no_extension_and_float32_compute(tmp_path):
    flags = cpu_features.cpu_flags(_cpuinfo(tmp_path, EPYC_AVX2))
    assert "avx2" in flags and "avx512f" not in flags
    assert cpu_kernels.missing_isa(flags) == ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi",
                                              "avx512_bf16", "avx512_vnni"]
    assert not cpu_features.fast_bf16(flags) and not cpu_features.fast_int8(flags)


def test_zen4_cpu_gets_everything(tmp_path):
    flags = cpu_features.cpu_flags(_cpuinfo(tmp_path, ZEN4))
    assert cpu_kernels.missing_isa(flags) == []
    assert cpu_features.fast_bf16(flags) and cpu_features.fast_int8(flags)


def test_unknown_cpu_never_imports_the_extension(tmp_path):
    assert cpu_features.cpu_flags(str(tmp_path / "absent")) is None
    assert cpu_kernels.missing_isa(None) == list(cpu_kernels.ISA_FLAGS)


def test_compute_dtype_follows_the_cpu_and_the_override(monkeypatch):
    want = torch.bfloat16 if cpu_features.fast_bf16() else torch.float32
    monkeypatch.delenv("LOWBIT_COMPUTE_DTYPE", raising=False)
    assert cpu_features.compute_dtype() == want
    monkeypatch.setenv("LOWBIT_COMPUTE_DTYPE", "float32")
    assert cpu_features.compute_dtype() == torch.float32


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 2600), n=st.integers(1, 9), seed=st.integers(0, 10**6),
       extreme=st.booleans())
def test_float32_int_matmul_is_exact(m, k, n, seed, extreme):
    g = torch.Generator().manual_seed(seed)
    if extreme:  # every product at its largest magnitude: the sums reach 2**24 per chunk of 1024
        q = torch.full((m, k), -128, dtype=torch.int8)
        w = torch.full((k, n), -128, dtype=torch.int8)
    else:
        q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
    got = int8.int_matmul_f32(q, w)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), q.long() @ w.long())
