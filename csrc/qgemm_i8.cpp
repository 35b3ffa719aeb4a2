// Prefill GEMM of packed integer codes with int8 activations (AVX-512 VNNI), llama.cpp's scheme for its
// quantized matmuls: activations quantized in blocks of 32 (one float scale per block, symmetric, like
// Q8_0), unsigned weight codes u multiplied with them by vpdpbusd (u8 x s8 -> int32), each block's integer
// sum scaled once. With w = S[n,g] * u - Z[n,g] (the int modes of gemv.h: S = s; Z = s * offset, s * z or z)
//
//   y[m,n] = sum_b d[m,b] * S[n,g(b)] * sum_{k in b} u[n,k] q[m,k]  -  sum_g A[m,g] Z[n,g]  + bias[n]
//   A[m,g] = sum_{b in g} d[m,b] * sum_{k in b} q[m,k]
//
// Weights are unpacked one tile of 32 output rows at a time into vpdpbusd's order (4 consecutive codes of
// a row in each 32-bit lane, 32 rows side by side; the tile's scratch only), then every input row reuses
// it. Codebook modes (NF4/FP4) have no integer form and stay on the bf16 path (QuantLinear).
#include "gemv.h"

namespace {
using namespace lowbit_cpu;

#ifndef LOWBIT_I8_NV
#define LOWBIT_I8_NV 2
#endif
#ifndef LOWBIT_I8_MR
#define LOWBIT_I8_MR 6
#endif
constexpr int NV = LOWBIT_I8_NV;  // registers of 16 int32 lanes per tile row
constexpr int NR = 16 * NV;       // output rows per tile
constexpr int QB = 32;  // activations per quantization block

struct Acts {  // int8 activations [M, K], block scales d [M, K/32], per-group sums A [M, G]
  std::vector<int8_t> q;
  std::vector<float> d, a;
};

Acts quantize_acts(const float* x, int64_t m, int64_t k, int64_t group) {
  const int64_t nb = k / QB, groups = k / group;
  Acts r;
  r.q.resize(m * k);
  r.d.resize(m * nb);
  r.a.assign(m * groups, 0.f);
  at::parallel_for(0, m, 16, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      for (int64_t b = 0; b < nb; ++b) {
        const float* p = x + i * k + b * QB;
        const __m512 v0 = _mm512_loadu_ps(p), v1 = _mm512_loadu_ps(p + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.f;
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // round to nearest even
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(r.q.data() + i * k + b * QB), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(r.q.data() + i * k + b * QB + 16), _mm512_cvtsepi32_epi8(q1));
        r.d[i * nb + b] = d;
        r.a[i * groups + b * QB / group] += d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
      }
    }
  });
  return r;
}

// one row's codes as bytes (u8 [K])
template <int LAYOUT>
void row_codes(const Layer& L, const Unpack& U, int64_t n, uint8_t* out) {
  const uint8_t* row = L.codes + n * L.row_bytes;
  if constexpr (LAYOUT == U8) {
    std::memcpy(out, row, L.k);
  } else {
    const int64_t bb = block_bytes(L);
    for (int64_t blk = 0; blk < L.k / 64; ++blk) {
      __m512i c0, c1;
      codes64<LAYOUT>(U, row + blk * bb, c0, c1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + blk * 64), _mm512_cvtepi16_epi8(c0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + blk * 64 + 32), _mm512_cvtepi16_epi8(c1));
    }
  }
}

struct Tile {  // one tile's weights in vpdpbusd order and its S / Z per group, fp32 [G][NR]
  std::vector<uint32_t> w;
  std::vector<float> s, z;
  std::vector<uint8_t> row;
};

template <int LAYOUT>
void unpack_tile(const Layer& L, const Unpack& U, int64_t n0, int64_t rows, Tile& t) {
  const int64_t k4 = L.k / 4;
  for (int64_t r = 0; r < NR; ++r) {
    if (r >= rows) {
      for (int64_t j = 0; j < k4; ++j) t.w[j * NR + r] = 0;
      for (int64_t g = 0; g < L.groups; ++g) t.s[g * NR + r] = t.z[g * NR + r] = 0.f;
      continue;
    }
    const int64_t n = n0 + r;
    row_codes<LAYOUT>(L, U, n, t.row.data());
    const uint32_t* src = reinterpret_cast<const uint32_t*>(t.row.data());
    for (int64_t j = 0; j < k4; ++j) t.w[j * NR + r] = src[j];
    for (int64_t g = 0; g < L.groups; ++g) {
      const float s = load1(L.scale, L.sdtype, n * L.s_row + g);
      t.s[g * NR + r] = s;
      t.z[g * NR + r] = L.mode == 0 ? s * static_cast<float>(L.offset)
                        : L.mode == 1 ? s * load1(L.zero, L.sdtype, n * L.z_row + g)
                                      : load1(L.zero, L.sdtype, n * L.z_row + g);
    }
  }
}

// MR input rows x NR outputs: int32 sums per activation block, fp32 totals across blocks
template <int MR>
void micro(const Layer& L, const Acts& X, int64_t m0, const Tile& t, const float* bias, float* y, int64_t n0,
           int64_t cols) {
  const int64_t k = L.k, nb = k / QB;
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const int8_t* xq = X.q.data() + m0 * k;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i s32[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) s32[r][v] = _mm512_setzero_si512();
    const uint32_t* w = t.w.data() + b * (QB / 4) * NR;
#pragma GCC unroll 8
    for (int j = 0; j < QB / 4; ++j) {
      __m512i wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(w + j * NR + 16 * v);
      for (int r = 0; r < MR; ++r) {
        int32_t xv;
        std::memcpy(&xv, xq + r * k + b * QB + 4 * j, 4);
        const __m512i xb = _mm512_set1_epi32(xv);
        for (int v = 0; v < NV; ++v) s32[r][v] = _mm512_dpbusd_epi32(s32[r][v], wv[v], xb);
      }
    }
    const int64_t g = b * QB / L.group;
    __m512 sv[NV];
    for (int v = 0; v < NV; ++v) sv[v] = _mm512_loadu_ps(t.s.data() + g * NR + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512 dv = _mm512_set1_ps(X.d[(m0 + r) * nb + b]);
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32[r][v]), _mm512_mul_ps(sv[v], dv), acc[r][v]);
    }
  }
  for (int64_t g = 0; g < L.groups; ++g) {  // the zero / offset term
    for (int v = 0; v < NV; ++v) {
      const __m512 zv = _mm512_loadu_ps(t.z.data() + g * NR + 16 * v);
      for (int r = 0; r < MR; ++r)
        acc[r][v] = _mm512_fnmadd_ps(_mm512_set1_ps(X.a[(m0 + r) * L.groups + g]), zv, acc[r][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t c = cols - 16 * v;
    const __mmask16 km = c >= 16 ? 0xFFFF : (c <= 0 ? 0 : static_cast<__mmask16>((1u << c) - 1));
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(km, bias + n0 + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * L.n + n0 + 16 * v, km, _mm512_add_ps(acc[r][v], bv));
  }
}

constexpr int MR = LOWBIT_I8_MR;  // input rows per micro-tile

template <int LAYOUT>
void gemm(const Layer& L, const Acts& X, int64_t m, const float* bias, float* y) {
  const int64_t tiles = (L.n + NR - 1) / NR;
  at::parallel_for(0, tiles, 1, [&](int64_t a, int64_t e) {
    Unpack U(L.bits);
    Tile t;
    t.w.resize(L.k / 4 * NR);
    t.s.resize(L.groups * NR);
    t.z.resize(L.groups * NR);
    t.row.resize(L.k);
    for (int64_t ti = a; ti < e; ++ti) {
      const int64_t n0 = ti * NR, cols = std::min<int64_t>(NR, L.n - n0);
      unpack_tile<LAYOUT>(L, U, n0, cols, t);
      int64_t i = 0;
      for (; i + MR <= m; i += MR) micro<MR>(L, X, i, t, bias, y, n0, cols);
      for (; i < m; ++i) micro<1>(L, X, i, t, bias, y, n0, cols);
    }
  });
}

at::Tensor qgemm_i8(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale,
                    const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& perm,
                    const c10::optional<at::Tensor>& bias, int64_t bits, int64_t layout, int64_t group, int64_t mode,
                    int64_t offset) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, K]");
  TORCH_CHECK(mode >= 0 && mode <= 2, "int8 activations need integer codes (modes 0..2), got mode ", mode);
  const int64_t k = x_in.size(1), m = x_in.size(0);
  Layer L = make_layer(qweight, scale, zero, bits, layout, k, group, mode, offset);
  at::Tensor x = x_in.to(at::kFloat);
  if (perm.has_value()) x = x.index_select(1, *perm);
  x = x.contiguous();
  at::Tensor b;
  const float* bptr = nullptr;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    bptr = b.data_ptr<float>();
  }
  Acts X = quantize_acts(x.data_ptr<float>(), m, k, L.group);
  at::Tensor y = at::empty({m, L.n}, at::kFloat);
  switch (L.layout) {
    case B4: gemm<B4>(L, X, m, bptr, y.data_ptr<float>()); break;
    case B2: gemm<B2>(L, X, m, bptr, y.data_ptr<float>()); break;
    case B3: gemm<B3>(L, X, m, bptr, y.data_ptr<float>()); break;
    case U8: gemm<U8>(L, X, m, bptr, y.data_ptr<float>()); break;
    default: gemm<GENERIC>(L, X, m, bptr, y.data_ptr<float>());
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

bool vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}

}  // namespace

void register_qgemm_i8(pybind11::module& m) {
  m.def("qgemm_i8", &qgemm_i8, "y = x @ W^T + bias with x quantized to int8 in blocks of 32 (VNNI; prefill)");
  m.def("vnni_supported", &vnni_supported, "whether this CPU has AVX-512 VNNI (qgemm_i8)");
}
