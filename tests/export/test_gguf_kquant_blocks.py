"""GGUF Q2_K / Q3_K (and every other layout) against llama.cpp's own block code.

The `gguf` package decodes Q2_K/Q3_K but cannot encode them, so arbitrary blocks (llama.cpp's
negative super-block factors and signed Q3_K scales included) are checked through its decoder;
where llama.cpp's ggml library is installed (bench/.venv-llamacpp, or the venv whose python
LLAMACPP_PYTHON names) its own `to_float` / `from_float_ref` (ggml_get_type_traits) decide:
lowbit's blocks dequantize bit for bit as lowbit's records, and llama.cpp's blocks read back as
records that dequantize to llama.cpp's values and are written back byte for byte."""

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lowbit.core.quantize import quantize
from lowbit.export.gguf_blocks import LAYOUTS, decode, encode

ROOT = Path(__file__).resolve().parents[2]


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def _random_blocks(name: str, nb: int, seed: int) -> np.ndarray:
    """Any bytes, with float16 factors that are finite and nonzero (negative ones too)."""
    rng = np.random.default_rng(seed)
    lay = LAYOUTS[name]
    b = rng.integers(0, 256, (nb, lay.nbytes), dtype=np.uint8)
    d = (rng.uniform(1e-3, 2e-2, nb) * rng.choice([-1, 1], nb)).astype(np.float16).view(np.uint8).reshape(nb, 2)
    if name == "Q3_K":
        b[:, 108:110] = d
    else:  # Q2_K: d, dmin
        b[:, 80:82] = np.abs(d.view(np.float16)).view(np.uint8).reshape(nb, 2)
        b[:, 82:84] = d
    return b


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K"])
def test_any_blocks_decode_like_the_gguf_package_and_encode_back(name):
    rows, cols = 4, 512
    data = _random_blocks(name, rows * cols // 256, seed=len(name)).reshape(rows, -1)
    qtype = gguf.GGMLQuantizationType[name]
    qw = decode(data, LAYOUTS[name], rows, cols)
    assert np.array_equal(_bits(gguf.quants.dequantize(data, qtype)), _bits(qw.dequantize().numpy()))
    back = decode(encode(qw, LAYOUTS[name]), LAYOUTS[name], rows, cols)  # same products (d's sign may differ)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert (back.zero is None and qw.zero is None) or torch.equal(back.zero, qw.zero)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K"])
def test_k_layout_sizes_are_llamacpps(name):
    lay = LAYOUTS[name]
    assert (lay.block, lay.nbytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    assert lay.bits_per_weight == {"Q2_K": 2.625, "Q3_K": 3.4375}[name]
    assert lay.fallback == "Q4_0"  # what llama-quantize writes for rows not a multiple of 256


def _ggml_lib():
    cands = []
    if os.environ.get("LLAMACPP_PYTHON"):
        cands.append(Path(os.environ["LLAMACPP_PYTHON"]).absolute().parents[1])
    cands.append(ROOT / "bench" / ".venv-llamacpp")
    for venv in cands:
        for lib in sorted(venv.glob("lib/python*/site-packages/llama_cpp/lib/libggml-base.so")):
            return ctypes.CDLL(str(lib))
    return None


class _Traits(ctypes.Structure):  # ggml.h: struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml():
    lib = _ggml_lib()
    if lib is None:
        pytest.skip("llama.cpp's ggml library not installed (make bench-venv-llamacpp, or set LLAMACPP_PYTHON)")
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)

    def traits(name):
        t = lib.ggml_get_type_traits(int(gguf.GGMLQuantizationType[name])).contents
        assert (t.blck_size, t.type_size) == (LAYOUTS[name].block, LAYOUTS[name].nbytes)
        return t

    return traits


def _to_float(t, data: np.ndarray, n: int) -> np.ndarray:
    data = np.ascontiguousarray(data)
    y = np.zeros(n, np.float32)
    _FN(t.to_float)(data.ctypes.data, y.ctypes.data, n)
    return y


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_llamacpp_dequantizes_lowbits_blocks_as_the_record(ggml, name):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(6, 512, generator=g) * 0.05
    W[0, :64] = 0.0
    W[1] += 0.04
    W[2, 5] = 0.9
    qw = quantize(W, LAYOUTS[name].spec)
    y = _to_float(ggml(name), encode(qw, LAYOUTS[name], "w"), W.numel())
    assert np.array_equal(_bits(y), _bits(qw.dequantize().numpy().reshape(-1)))


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_llamacpps_own_blocks_read_back_exactly(ggml, name):
    t = ggml(name)
    x = (np.random.default_rng(3).standard_normal(8 * 512) * 0.05).astype(np.float32)
    data = np.zeros(x.size // t.blck_size * t.type_size, np.uint8)
    _FN(t.from_float_ref)(x.ctypes.data, data.ctypes.data, x.size)  # llama.cpp's reference quantizer
    data = data.reshape(8, -1)
    qw = decode(data, LAYOUTS[name], 8, 512)
    assert np.array_equal(_bits(_to_float(t, data, x.size)), _bits(qw.dequantize().numpy().reshape(-1)))
    again = encode(qw, LAYOUTS[name])  # lowbit writes them back: llama.cpp reads the same values
    assert np.array_equal(_bits(_to_float(t, again, x.size)), _bits(qw.dequantize().numpy().reshape(-1)))
