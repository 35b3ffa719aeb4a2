"""GGUF block layouts (llama.cpp's ggml-quants), each an explicit struct that a record maps onto.

A quantized-layer record whose spec is a type's `spec` maps to that type's blocks field by field,
nothing re-rounded (u = the unsigned code stored, code = the record's code):

| type | record spec                     | block fields (bytes per block)                         | w                 |
|------|---------------------------------|--------------------------------------------------------|-------------------|
| Q8_0 | int8 sym g32, fp16 scale        | d f16, qs i8[32] (34)                                  | d·code            |
| Q4_0 | int4 sym g32                    | d, qs u4[32] (18), u = code + 8                        | d·(u − 8)         |
| Q5_0 | int5 sym g32                    | d, qh u32, qs u4[32] (22), u = code + 16               | d·(u − 16)        |
| Q4_1 | int4 asym-min g32 (scaled zero) | d, m f16, qs (20), m = −zero                           | d·u + m           |
| Q5_1 | int5 asym-min g32               | d, m, qh, qs (24)                                      | d·u + m           |
| Q4_K | int4 asym-min g32, sb256 x 6b   | d, dmin f16, scales 6b x (8 sc + 8 m) [12], qs [128] (144) | d·sc·u − dmin·m |
| Q5_K | int5 asym-min g32, sb256 x 6b   | d, dmin, scales [12], qh [32], qs [128] (176)          | d·sc·u − dmin·m   |
| Q6_K | int6 sym g16, sb256 x 8b        | ql [128], qh [64], scales i8[16], d (210), u = code+32 | d·sc·(u − 32)     |
| Q3_K | int3 sym g16, sb256 x 6b        | hmask [32], qs 2b [64], scales 6b [12], d (110), u = code+4 | d·(s − 32)·(u − 4) |
| Q2_K | int2 asym-min g16, sb256 x 4b   | scales 4b sc + 4b m [16], qs 2b [64], d, dmin (84)    | d·sc·u − dmin·m   |

Q3_K's stored scale byte s is the signed multiplier + 32. K-type records hold scale = d·sc and zero = dmin·m as float32 products (exact); `encode` recovers
d, sc, dmin, m exactly or refuses. `decode` is the inverse. Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec

QK_K = 256
F16 = np.float16


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(F16).reshape(-1, 1)).view(np.uint8)


def _f16_from(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(F16).reshape(-1)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """[nb, 32] values 0..15 (low 4 bits used) -> [nb, 16] bytes: first half low nibbles, second high."""
    return ((u[:, :16] & 0xF) | ((u[:, 16:] & 0xF) << 4)).astype(np.uint8)


def _from_nibbles(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & 0xF, b >> 4], axis=1)


def _qh32(u: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 values as one little-endian uint32 ([nb, 4] bytes)."""
    return np.packbits((u >> 4) & 1, axis=-1, bitorder="little")


def _from_qh32(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b, axis=-1, bitorder="little")[:, :32]


def split_products(v: np.ndarray, lo: int, hi: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 v [nb, k] -> (d float16 [nb], m int [nb, k] in [lo, hi]) with float32(d)·m == v exactly.

    Tries d = v_ref / k for the value of largest magnitude and k = hi, hi-1, ... (then negative k
    when lo < 0), per block, until every product matches bit for bit; raises if one never does.
    """
    v = np.asarray(v, np.float32)
    nb = v.shape[0]
    d = np.zeros(nb, F16)
    m = np.zeros(v.shape, np.int32)
    done = np.all(v == 0, axis=1)
    ref = v[np.arange(nb), np.abs(v).argmax(axis=1)]
    ks = list(range(hi, 0, -1)) + list(range(-1, lo - 1, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in ks:
            todo = np.nonzero(~done)[0]
            if not len(todo):
                break
            dk = (ref[todo] / np.float32(k)).astype(F16)
            df = dk.astype(np.float32)[:, None]
            mk = np.rint(v[todo] / df)
            ok = (df[:, 0] != 0) & np.all((mk >= lo) & (mk <= hi), axis=1) & np.all(df * mk == v[todo], axis=1)
            idx = todo[ok]
            d[idx] = dk[ok]
            m[idx] = mk[ok].astype(np.int32)
            done[idx] = True
    if not done.all():
        bad = int(np.nonzero(~done)[0][0])
        raise ValueError(f"{what} of block {bad} ({v[bad].tolist()[:4]}...) are not a float16 factor times "
                         f"integers in [{lo}, {hi}]")
    return d, m


# ---- scales of Q4_K / Q5_K: 8 six-bit scales and 8 six-bit mins in 12 bytes ----------------------
def _pack_k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    out = np.zeros((sc.shape[0], 12), np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out


def _unpack_k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, mid, hi = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


# ---- per type: pack(u [nb, block] uint8, scale [nb, k], zero [nb, k] | None) -> bytes; unpack ----
def _pack_q8_0(u, s, z):
    return np.concatenate([_f16_bytes(s), u.astype(np.uint8)], axis=1)


def _unpack_q8_0(b):
    return b[:, 2:].copy(), _f16_from(b[:, :2])[:, None], None


def _pack_q4_0(u, s, z):
    return np.concatenate([_f16_bytes(s), _nibbles(u)], axis=1)


def _unpack_q4_0(b):
    return _from_nibbles(b[:, 2:]), _f16_from(b[:, :2])[:, None], None


def _pack_q5_0(u, s, z):
    return np.concatenate([_f16_bytes(s), _qh32(u), _nibbles(u)], axis=1)


def _unpack_q5_0(b):
    return _from_nibbles(b[:, 6:]) | (_from_qh32(b[:, 2:6]) << 4), _f16_from(b[:, :2])[:, None], None


def _pack_q4_1(u, s, z):
    return np.concatenate([_f16_bytes(s), _f16_bytes(-z.astype(F16)), _nibbles(u)], axis=1)


def _unpack_q4_1(b):
    return _from_nibbles(b[:, 4:]), _f16_from(b[:, :2])[:, None], -_f16_from(b[:, 2:4])[:, None]


def _pack_q5_1(u, s, z):
    return np.concatenate([_f16_bytes(s), _f16_bytes(-z.astype(F16)), _qh32(u), _nibbles(u)], axis=1)


def _unpack_q5_1(b):
    u = _from_nibbles(b[:, 8:]) | (_from_qh32(b[:, 4:8]) << 4)
    return u, _f16_from(b[:, :2])[:, None], -_f16_from(b[:, 2:4])[:, None]


def _k_params(s, z):
    d, sc = split_products(s, 0, 63, "scales")
    dmin, mn = split_products(z, 0, 63, "zero offsets (mins)")
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(sc, mn)], axis=1)


def _k_unparams(b):
    d, dmin = _f16_from(b[:, 0:2]).astype(np.float32), _f16_from(b[:, 2:4]).astype(np.float32)
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    return d[:, None] * sc.astype(np.float32), dmin[:, None] * mn.astype(np.float32)


def _k_low(u):
    """[nb, 256] -> [nb, 128]: per 64-weight chunk, byte l = u[l] | u[l + 32] << 4."""
    c = u.reshape(-1, 4, 2, 32) & 0xF
    return (c[:, :, 0] | (c[:, :, 1] << 4)).astype(np.uint8).reshape(-1, 128)


def _from_k_low(b):
    c = b.reshape(-1, 4, 1, 32)
    return np.concatenate([c & 0xF, c >> 4], axis=2).reshape(-1, 256)


def _pack_q4_k(u, s, z):
    return np.concatenate([_k_params(s, z), _k_low(u)], axis=1)


def _unpack_q4_k(b):
    s, z = _k_unparams(b)
    return _from_k_low(b[:, 16:]), s, z


def _pack_q5_k(u, s, z):
    return np.concatenate([_k_params(s, z), _bit_planes((u >> 4) & 1), _k_low(u)], axis=1)


def _unpack_q5_k(b):
    s, z = _k_unparams(b)
    return _from_k_low(b[:, 48:]) | (_from_bit_planes(b[:, 16:48]) << 4), s, z


def _pack_q6_k(u, s, z):
    L = u.reshape(-1, 2, 4, 32).astype(np.uint8)  # [nb, half, sub, l]
    ql = (L[:, :, 0:2] & 0xF) | ((L[:, :, 2:4] & 0xF) << 4)  # [nb, half, 2, 32]
    qh = np.bitwise_or.reduce(((L >> 4) & 3) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    d, sc = split_products(s, -128, 127, "scales")
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), _f16_bytes(d)],
                          axis=1)


def _unpack_q6_k(b):
    ql = b[:, :128].reshape(-1, 2, 1, 64)
    ql = np.concatenate([ql & 0xF, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    u = (ql | ((qh & 3) << 4)).reshape(-1, 256)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16_from(b[:, 208:210]).astype(np.float32)
    return u, d[:, None] * sc, None


# ---- Q3_K / Q2_K: 2 low bits of each weight; weight p of a super-block sits in qs[32·(p // 128) + p % 32]
# at bits 2·((p // 32) % 4); Q3_K's third bit in hmask[p % 32] at bit p // 32 ---------------------------
def _q2_low(u):
    c = (u.reshape(-1, 2, 4, 32) & 3).astype(np.uint8)
    return np.bitwise_or.reduce(c << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2).reshape(-1, 64)


def _from_q2_low(b):
    return ((b.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3).reshape(-1, 256)


def _bit_planes(bit: np.ndarray) -> np.ndarray:
    """[nb, 256] 0/1 -> [nb, 32]: bit j of byte l = weight 32·j + l (Q5_K's qh, Q3_K's hmask)."""
    return np.bitwise_or.reduce(bit.reshape(-1, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None],
                                axis=1)


def _from_bit_planes(b: np.ndarray) -> np.ndarray:
    return ((b[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, 256)


def _pack_q3_scales(s: np.ndarray) -> np.ndarray:
    """16 six-bit values -> 12 bytes: low nibbles of 0-7 | 8-15 in bytes 0-7, bits 4-5 of value 4c+k
    in byte 8+k at bits 2c."""
    s = s.astype(np.uint8)
    out = np.zeros((s.shape[0], 12), np.uint8)
    out[:, 0:8] = (s[:, 0:8] & 0xF) | ((s[:, 8:16] & 0xF) << 4)
    hi = (s >> 4).reshape(-1, 4, 4)  # [nb, c, k]
    out[:, 8:12] = np.bitwise_or.reduce(hi << (2 * np.arange(4, dtype=np.uint8))[None, :, None], axis=1)
    return out


def _unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    lo = np.concatenate([b[:, 0:8] & 0xF, b[:, 0:8] >> 4], axis=1)
    hi = (b[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3  # [nb, c, k]
    return lo | (hi.reshape(-1, 16) << 4)


def _pack_q3_k(u, s, z):
    d, sc = split_products(s, -32, 31, "scales")
    return np.concatenate([_bit_planes((u >> 2) & 1), _q2_low(u), _pack_q3_scales(sc + 32), _f16_bytes(d)], axis=1)


def _unpack_q3_k(b):
    u = _from_q2_low(b[:, 32:96]) | (_from_bit_planes(b[:, 0:32]) << 2)
    sc = _unpack_q3_scales(b[:, 96:108]).astype(np.float32) - 32
    d = _f16_from(b[:, 108:110]).astype(np.float32)
    return u, d[:, None] * sc, None


def _pack_q2_k(u, s, z):
    d, sc = split_products(s, 0, 15, "scales")
    dmin, mn = split_products(z, 0, 15, "zero offsets (mins)")
    scales = (sc | (mn << 4)).astype(np.uint8)
    return np.concatenate([scales, _q2_low(u), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _unpack_q2_k(b):
    d, dmin = _f16_from(b[:, 80:82]).astype(np.float32), _f16_from(b[:, 82:84]).astype(np.float32)
    sc = b[:, 0:16]
    return _from_q2_low(b[:, 16:80]), d[:, None] * (sc & 0xF), dmin[:, None] * (sc >> 4)


@dataclass(frozen=True)
class Layout:
    name: str
    block: int  # weights per block
    nbytes: int  # bytes per block
    spec: QuantSpec  # the record spec that maps onto it one to one
    pack: Callable
    unpack: Callable
    fallback: str | None = None  # llama.cpp's substitute when a row is not a multiple of `block`

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.block

    @property
    def offset(self) -> int:
        """Record code + offset = stored unsigned code (Q8_0 stores the signed byte)."""
        return 0 if not self.spec.symmetric or self.spec.bits == 8 else 2 ** (self.spec.bits - 1)


def _g(bits, sym, gs=32, **kw):
    return QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=gs, scaled_zero=not sym, **kw)


_K = dict(scale_dtype="float32", superblock=QK_K)
LAYOUTS: dict[str, Layout] = {
    "Q8_0": Layout("Q8_0", 32, 34, _g(8, True), _pack_q8_0, _unpack_q8_0),
    "Q4_0": Layout("Q4_0", 32, 18, _g(4, True), _pack_q4_0, _unpack_q4_0),
    "Q4_1": Layout("Q4_1", 32, 20, _g(4, False), _pack_q4_1, _unpack_q4_1),
    "Q5_0": Layout("Q5_0", 32, 22, _g(5, True), _pack_q5_0, _unpack_q5_0),
    "Q5_1": Layout("Q5_1", 32, 24, _g(5, False), _pack_q5_1, _unpack_q5_1),
    "Q4_K": Layout("Q4_K", QK_K, 144, _g(4, False, scale_bits=6, **_K), _pack_q4_k, _unpack_q4_k, "Q5_0"),
    "Q5_K": Layout("Q5_K", QK_K, 176, _g(5, False, scale_bits=6, **_K), _pack_q5_k, _unpack_q5_k, "Q5_1"),
    "Q6_K": Layout("Q6_K", QK_K, 210, _g(6, True, 16, scale_bits=8, **_K), _pack_q6_k, _unpack_q6_k, "Q8_0"),
    # llama.cpp (llama-quantize, ggml 0.25 in bench/.venv-llamacpp) falls back to Q4_0 for these
    "Q3_K": Layout("Q3_K", QK_K, 110, _g(3, True, 16, scale_bits=6, **_K), _pack_q3_k, _unpack_q3_k, "Q4_0"),
    "Q2_K": Layout("Q2_K", QK_K, 84, _g(2, False, 16, scale_bits=4, **_K), _pack_q2_k, _unpack_q2_k, "Q4_0"),
}


def layout_for_spec(spec: QuantSpec) -> Layout | None:
    for lay in LAYOUTS.values():
        if lay.spec == spec:
            return lay
    return None


def type_for_row(type_name: str, cols: int) -> str:
    """llama.cpp's choice for a row of `cols` weights: the type, or its fallback when the row is not
    a multiple of the type's block (Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, as llama-quantize)."""
    lay = LAYOUTS[type_name]
    if cols % lay.block == 0:
        return type_name
    if lay.fallback is None or cols % LAYOUTS[lay.fallback].block:
        raise LowbitError(f"rows of {cols} weights fit no GGUF block type from {type_name}")
    return lay.fallback


def encode(qw: QuantizedWeight, lay: Layout, name: str = "tensor") -> np.ndarray:
    """The record's blocks as uint8 [rows, cols / block * nbytes], nothing re-rounded."""
    rows, cols = qw.shape
    if qw.spec != lay.spec or qw.g_idx is not None or cols % lay.block:
        raise LowbitError(f"{name}: a {qw.spec.describe()} record {rows}x{cols}"
                          f"{' with act-order g_idx' if qw.g_idx is not None else ''} does not map onto "
                          f"GGUF {lay.name} ({lay.spec.describe()}, rows a multiple of {lay.block})")
    nb = rows * cols // lay.block
    u = (qw.codes.to(torch.int16) + lay.offset).numpy().astype(np.uint8).reshape(nb, lay.block)
    k = lay.block // lay.spec.group_size
    s = qw.scale.expand(rows, -1).numpy().reshape(nb, k)
    z = None if qw.zero is None else qw.zero.expand(rows, -1).numpy().reshape(nb, k)
    try:
        out = lay.pack(u, s, z)
    except ValueError as e:
        raise LowbitError(f"{name}: not on the GGUF {lay.name} grid: {e}; quantize it with "
                          f"--format gguf --format-option type={lay.name}") from None
    assert out.shape == (nb, lay.nbytes), (out.shape, lay.name)
    return out.reshape(rows, cols // lay.block * lay.nbytes)


def decode(data: np.ndarray, lay: Layout, rows: int, cols: int) -> QuantizedWeight:
    """The record of a tensor's blocks (uint8 [rows, row bytes])."""
    nb = rows * cols // lay.block
    u, s, z = lay.unpack(np.ascontiguousarray(data).reshape(nb, lay.nbytes))
    spec = lay.spec
    if spec.bits == 8:  # Q8_0 stores the signed byte itself
        codes = torch.from_numpy(np.ascontiguousarray(u).view(np.int8).reshape(rows, cols).copy())
    else:
        codes = (torch.from_numpy(u.astype(np.int16).reshape(rows, cols)) - lay.offset)
        codes = codes.to(torch.int8 if spec.symmetric else torch.uint8)
    k = cols // spec.group_size
    scale = torch.from_numpy(np.ascontiguousarray(s).reshape(rows, k))
    zero = None if z is None else torch.from_numpy(np.ascontiguousarray(z).reshape(rows, k))
    return QuantizedWeight(codes, scale, zero, spec)
