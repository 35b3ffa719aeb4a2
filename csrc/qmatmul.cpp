// lowbit's CPU kernels for QuantLinear, bound as lowbit._cpu: qmatmul (few-row GEMV over packed codes),
// dequant (dense bf16 weight for prefill), the decoder runtime (decoder.cpp) and the int8 layers' quantize /
// rescale passes (int8.cpp). Layouts and modes: gemv.h.
#include "gemv.h"

namespace {
using namespace lowbit_cpu;

at::Tensor qmatmul(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& table,
                   const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                   int64_t bits, int64_t layout, int64_t group, int64_t mode, int64_t offset) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, K]");
  const int64_t k = x_in.size(1), rows = x_in.size(0);
  Layer L = make_layer(qweight, scale, zero, bits, layout, k, group, mode, offset);
  at::Tensor x = x_in.to(at::kFloat);
  if (perm.has_value()) x = x.index_select(1, *perm);
  x = x.contiguous();
  at::Tensor y = at::empty({rows, L.n}, at::kFloat);
  const float* bptr = nullptr;
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    bptr = b.data_ptr<float>();
  }
  std::vector<uint16_t> xb(layout == U8 ? 0 : rows * k);
  std::vector<float> xs(rows * L.groups);
  Unpack U(L.bits);
  Values V(L, table);
  gemv_rows(L, U, V, x.data_ptr<float>(), rows, bptr, y.data_ptr<float>(), xb.data(), xs.data());
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

// ---- dequantization -----------------------------------------------------------------------------
inline void store_bf16x16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

template <int LAYOUT>
void dequant_rows(const Layer& L, const Unpack& U, const __m512 tab, uint16_t* o, int64_t a, int64_t e) {
  const int64_t bb = block_bytes(L);
  const __m512i off = _mm512_set1_epi32(L.mode == 0 ? L.offset : 0);
  for (int64_t n = a; n < e; ++n) {
    const uint8_t* row = L.codes + n * L.row_bytes;
    for (int64_t blk = 0; blk < L.k / 64; ++blk) {
      __m512i c[2];
      codes64<LAYOUT>(U, row + blk * bb, c[0], c[1]);
      for (int h = 0; h < 2; ++h) {
        const int64_t k0 = blk * 64 + h * 32, g = k0 / L.group;
        const float s = load1(L.scale, L.sdtype, n * L.s_row + g);
        const float z = L.mode == 1 ? load1(L.zero, L.sdtype, n * L.z_row + g) * s
                                    : (L.mode == 2 ? load1(L.zero, L.sdtype, n * L.z_row + g) : 0.f);
        const __m512 sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(-z);
        for (int q = 0; q < 2; ++q) {
          __m512i u = _mm512_cvtepu16_epi32(q ? _mm512_extracti64x4_epi64(c[h], 1) : _mm512_castsi512_si256(c[h]));
          __m512 v = L.mode == 3 ? _mm512_permutexvar_ps(u, tab) : _mm512_cvtepi32_ps(_mm512_sub_epi32(u, off));
          store_bf16x16(o + n * L.k + k0 + 16 * q, _mm512_fmadd_ps(v, sv, bv));
        }
      }
    }
  }
}

// codes of at most 5 bits: each group's 2^bits values computed once (the same fma as above) and
// rounded to bf16 into a 32-entry table; then one permute turns 32 codes into 32 bf16 weights
template <int LAYOUT>
void dequant_rows_lut(const Layer& L, const Unpack& U, const __m512 tab, uint16_t* o, int64_t a, int64_t e) {
  const int64_t bb = block_bytes(L);
  const __m512 idx = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 off = _mm512_set1_ps(L.mode == 0 ? static_cast<float>(L.offset) : 0.f);
  const __m512 base_lo = L.mode == 3 ? tab : _mm512_sub_ps(idx, off);
  const __m512 base_hi = L.mode == 3 ? _mm512_setzero_ps() : _mm512_sub_ps(_mm512_add_ps(idx, _mm512_set1_ps(16.f)), off);
  for (int64_t n = a; n < e; ++n) {
    const uint8_t* row = L.codes + n * L.row_bytes;
    int64_t cur = -1;
    __m512i lut = _mm512_setzero_si512();
    for (int64_t blk = 0; blk < L.k / 64; ++blk) {
      __m512i c[2];
      codes64<LAYOUT>(U, row + blk * bb, c[0], c[1]);
      for (int h = 0; h < 2; ++h) {
        const int64_t k0 = blk * 64 + h * 32, g = k0 / L.group;
        if (g != cur) {
          const float s = load1(L.scale, L.sdtype, n * L.s_row + g);
          const float z = L.mode == 1 ? load1(L.zero, L.sdtype, n * L.z_row + g) * s
                                      : (L.mode == 2 ? load1(L.zero, L.sdtype, n * L.z_row + g) : 0.f);
          const __m512 sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(-z);
          const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(base_lo, sv, bv));
          const __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(base_hi, sv, bv));
          lut = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
          cur = g;
        }
        _mm512_storeu_si512(o + n * L.k + k0, _mm512_permutexvar_epi16(c[h], lut));
      }
    }
  }
}

at::Tensor dequant(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                   const c10::optional<at::Tensor>& table, int64_t bits, int64_t layout, int64_t k, int64_t group,
                   int64_t mode, int64_t offset) {
  Layer L = make_layer(qweight, scale, zero, bits, layout, k, group, mode, offset);
  at::Tensor out = at::empty({L.n, k}, at::kBFloat16);
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  if (layout == U8) {
    over_rows(L.n, 1, [&](int64_t a, int64_t e) {
      for (int64_t n = a; n < e; ++n) {
        const uint8_t* row = L.codes + n * L.row_bytes;
        for (int64_t g = 0; g < L.groups; ++g) {
          const float s = load1(L.scale, L.sdtype, n * L.s_row + g);
          const float z = L.mode == 1 ? load1(L.zero, L.sdtype, n * L.z_row + g) * s
                                      : (L.mode == 2 ? load1(L.zero, L.sdtype, n * L.z_row + g) : 0.f);
          const float off = L.mode == 0 ? static_cast<float>(L.offset) : 0.f;
          const __m512 sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(-off * s - z);
          for (int64_t k0 = g * L.group; k0 < (g + 1) * L.group; k0 += 16) {
            __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0)));
            store_bf16x16(o + n * k + k0, _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), sv, bv));
          }
        }
      }
    });
    return out;
  }
  alignas(64) float tv[16] = {0};
  if (L.mode == 3) {
    TORCH_CHECK(table.has_value() && table->numel() >= 16, "mode 3 needs a table of 16 values");
    auto tf = table->to(at::kFloat).contiguous();
    for (int i = 0; i < 16; ++i) tv[i] = tf.data_ptr<float>()[i];  // exact fp32 values
  }
  const __m512 tab = _mm512_load_ps(tv);
  Unpack U(L.bits);
  over_rows(L.n, 1, [&](int64_t a, int64_t e) {
    if (L.bits <= 5) {
      switch (L.layout) {
        case B4: dequant_rows_lut<B4>(L, U, tab, o, a, e); break;
        case B2: dequant_rows_lut<B2>(L, U, tab, o, a, e); break;
        case B3: dequant_rows_lut<B3>(L, U, tab, o, a, e); break;
        default: dequant_rows_lut<GENERIC>(L, U, tab, o, a, e);
      }
      return;
    }
    switch (L.layout) {
      case B4: dequant_rows<B4>(L, U, tab, o, a, e); break;
      case B2: dequant_rows<B2>(L, U, tab, o, a, e); break;
      case B3: dequant_rows<B3>(L, U, tab, o, a, e); break;
      default: dequant_rows<GENERIC>(L, U, tab, o, a, e);
    }
  });
  return out;
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("f16c");
}

}  // namespace

void register_decoder(pybind11::module& m);  // decoder.cpp
void register_int8(pybind11::module& m);     // int8.cpp
void register_qgemm_i8(pybind11::module& m);  // qgemm_i8.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_supported", &cpu_supported, "whether this CPU has the instructions the kernels use");
  m.def("qmatmul", &qmatmul, "y = x @ W^T + bias from packed codes (few rows)");
  m.def("dequant", &dequant, "the dense bf16 weight from packed codes");
  register_decoder(m);
  register_int8(m);
  register_qgemm_i8(m);
}
