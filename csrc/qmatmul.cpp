// lowbit's CPU kernels for QuantLinear (AVX-512 BF16 + VBMI; selected at run time by lowbit.nn.cpu_kernels).
//
// Storage (one copy, as lowbit.core.packing writes it): unsigned codes of `bits` bits packed
// little-endian along each row into int32 words; 32 codes take exactly 4*bits bytes, so every
// 32-code chunk starts on a byte boundary. Scales / zeros per group, in float16, bfloat16 or float32.
//
//   mode 0  w = (u - offset) * s          symmetric int (offset = 2^(bits-1)) or unsigned (offset 0)
//   mode 1  w = (u - z) * s               asymmetric int, float zero point in code units
//   mode 2  w = u * s - z                 asymmetric int, zero in weight units (llama.cpp's min form)
//   mode 3  w = table[u] * s              codebooks (NF4, FP4)
//
// qmatmul: y[M, N] = x[M, K] @ W^T for few rows (batch-1 decode): codes are unpacked in registers
// (vpermb + vpsrlvw), mapped to bf16 through a 32/64-entry lookup table (vpermw / vpermt2w) and
// multiplied with bf16 activations by vdpbf16ps in fp32; the group scale is applied once per group.
// 8-bit codes take an fp32 path (the table would not fit a register). Nothing dense is materialised.
// dequant: the dense bf16 weight [N, K] (prefill multiplies it with a bf16 GEMM).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Unpack32 {  // 32 codes of `bits` bits from 4*bits bytes -> 32 uint16 lanes
  __m512i idx, shift, mask;
  __mmask64 load_mask;
  explicit Unpack32(int bits) {
    alignas(64) uint8_t id[64];
    alignas(64) uint16_t sh[32];
    for (int i = 0; i < 32; ++i) {
      int bit = i * bits;
      id[2 * i] = static_cast<uint8_t>(bit / 8);
      id[2 * i + 1] = static_cast<uint8_t>(bit / 8 + 1);
      sh[i] = static_cast<uint16_t>(bit % 8);
    }
    idx = _mm512_load_si512(id);
    shift = _mm512_load_si512(sh);
    mask = _mm512_set1_epi16(static_cast<int16_t>((1 << bits) - 1));
    load_mask = (1ULL << (4 * bits)) - 1;  // bits <= 8: at most 32 bytes
  }
  inline __m512i operator()(const uint8_t* p) const {
    __m512i raw = _mm512_maskz_loadu_epi8(load_mask, p);
    __m512i b = _mm512_permutexvar_epi8(idx, raw);
    return _mm512_and_si512(_mm512_srlv_epi16(b, shift), mask);
  }
};

inline uint16_t to_bf16_bits(float f) {  // round to nearest even (values are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

struct Lut {  // code -> bf16 value, up to 64 entries in two registers
  __m512i lo, hi;
  bool two;
  Lut(const std::vector<float>& values) {
    alignas(64) uint16_t t[64] = {0};
    for (size_t i = 0; i < values.size() && i < 64; ++i) t[i] = to_bf16_bits(values[i]);
    lo = _mm512_load_si512(t);
    hi = _mm512_load_si512(t + 32);
    two = values.size() > 32;
  }
  inline __m512i operator()(__m512i codes) const {
    return two ? _mm512_permutex2var_epi16(lo, codes, hi) : _mm512_permutexvar_epi16(codes, lo);
  }
};

struct Params {  // scale / zero access: [N|1, G|1] with element strides, any float dtype
  const void* scale;
  const void* zero;
  at::ScalarType dtype;
  int64_t s_row, s_col, z_row, z_col;
  inline float load(const void* base, int64_t i) const {
    switch (dtype) {
      case at::kHalf: return _cvtsh_ss(static_cast<const uint16_t*>(base)[i]);
      case at::kBFloat16: {
        uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
      }
      default: return static_cast<const float*>(base)[i];
    }
  }
  inline float s(int64_t n, int64_t g) const { return load(scale, n * s_row + g * s_col); }
  inline float z(int64_t n, int64_t g) const { return load(zero, n * z_row + g * z_col); }
};

struct Layer {
  const uint8_t* codes;
  int64_t row_bytes, n, k, group, groups;
  int bits, mode, offset;
  Params p;
};

Layer make_layer(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                 int64_t bits, int64_t k, int64_t group, int64_t mode, int64_t offset) {
  TORCH_CHECK(qweight.dtype() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be contiguous int32 [N, words]");
  TORCH_CHECK(bits >= 1 && bits <= 8 && bits != 7, "bits must be 1..6 or 8");
  TORCH_CHECK(mode >= 0 && mode <= 3 && !(mode == 3 && bits == 8), "unsupported mode ", mode, " for ", bits, " bits");
  TORCH_CHECK(k % 32 == 0 && group % 32 == 0 && k % group == 0, "K and the group size must be multiples of 32");
  TORCH_CHECK(qweight.size(1) * 32 == k * bits, "qweight has ", qweight.size(1), " words per row, expected ", k * bits / 32);
  TORCH_CHECK(scale.dim() == 2, "scale must be 2-D [N|1, G|1]");
  Layer L;
  L.codes = reinterpret_cast<const uint8_t*>(qweight.data_ptr<int32_t>());
  L.row_bytes = qweight.size(1) * 4;
  L.n = qweight.size(0);
  L.k = k;
  L.group = group;
  L.groups = k / group;
  L.bits = static_cast<int>(bits);
  L.mode = static_cast<int>(mode);
  L.offset = static_cast<int>(offset);
  auto st = scale.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, "scale must be float16, bfloat16 or float32");
  TORCH_CHECK(scale.size(1) == 1 || scale.size(1) == L.groups, "scale has ", scale.size(1), " columns for ", L.groups, " groups");
  L.p.scale = scale.data_ptr();
  L.p.dtype = st;
  L.p.s_row = scale.size(0) == 1 ? 0 : scale.stride(0);
  L.p.s_col = scale.size(1) == 1 ? 0 : scale.stride(1);
  L.p.zero = nullptr;
  L.p.z_row = L.p.z_col = 0;
  if (mode == 1 || mode == 2) {
    TORCH_CHECK(zero.has_value() && zero->scalar_type() == st && zero->sizes() == scale.sizes(),
                "modes 1 and 2 need a zero with the scale's shape and dtype");
    L.p.zero = zero->data_ptr();
    L.p.z_row = zero->size(0) == 1 ? 0 : zero->stride(0);
    L.p.z_col = zero->size(1) == 1 ? 0 : zero->stride(1);
  }
  return L;
}

std::vector<float> lut_values(const Layer& L, const c10::optional<at::Tensor>& table) {
  int n = 1 << L.bits;
  std::vector<float> v(n);
  if (L.mode == 3) {
    TORCH_CHECK(table.has_value() && table->numel() >= n, "mode 3 needs a value table of ", n, " entries");
    auto t = table->to(at::kFloat).contiguous();
    for (int i = 0; i < n; ++i) v[i] = t.data_ptr<float>()[i];
  } else {
    for (int i = 0; i < n; ++i) v[i] = static_cast<float>(L.mode == 0 ? i - L.offset : i);
  }
  return v;
}

// y[m, n] for M activation rows and R weight rows at a time (R*M independent accumulator chains hide
// the latency of vdpbf16ps / vfmadd; one activation load serves R rows).
// xb: bf16 activations [M, K]; xs: per-group activation sums [M, G] (zero-point correction)
template <int M, int R>
void gemv_lut(const Layer& L, const Lut& lut_in, const Unpack32& up, const uint16_t* xb, const float* xs,
              const float* bias, float* y, int64_t ldy, int64_t n) {
  // everything the inner loop reads lives in locals (registers), not behind references
  const int64_t k = L.k, chunk_bytes = 4 * L.bits, groups = L.groups, group = L.group;
  const __m512i idx = up.idx, shift = up.shift, mask = up.mask, lut_lo = lut_in.lo, lut_hi = lut_in.hi;
  const __mmask64 lm = up.load_mask;
  const bool two = lut_in.two, zc_mode = L.mode == 1 || L.mode == 2;
  const uint8_t* row[R];
  __m512 total[R][M];
  float corr[R][M];
  for (int r = 0; r < R; ++r) {
    row[r] = L.codes + (n + r) * L.row_bytes;
    for (int m = 0; m < M; ++m) { total[r][m] = _mm512_setzero_ps(); corr[r][m] = 0.f; }
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
      const int64_t off = (k0 / 32) * chunk_bytes;
      __m512i xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(xb + m * k + k0);
      for (int r = 0; r < R; ++r) {
        __m512i raw = _mm512_maskz_loadu_epi8(lm, row[r] + off);
        __m512i c = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(idx, raw), shift), mask);
        __m512i w = two ? _mm512_permutex2var_epi16(lut_lo, c, lut_hi) : _mm512_permutexvar_epi16(c, lut_lo);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w, (__m512bh)xv[m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float s = L.p.s(n + r, g);
      __m512 sv = _mm512_set1_ps(s);
      for (int m = 0; m < M; ++m) total[r][m] = _mm512_fmadd_ps(acc[r][m], sv, total[r][m]);
      if (zc_mode) {
        float zc = L.mode == 1 ? s * L.p.z(n + r, g) : L.p.z(n + r, g);
        for (int m = 0; m < M; ++m) corr[r][m] += zc * xs[m * groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float b = bias ? bias[n + r] : 0.f;
    for (int m = 0; m < M; ++m) y[m * ldy + n + r] = _mm512_reduce_add_ps(total[r][m]) - corr[r][m] + b;
  }
}

// 8-bit codes: fp32 activations, codes widened to int32 -> fp32, 16 per step
template <int M, int R>
void gemv_u8(const Layer& L, const float* xf, const float* xs, const float* bias, float* y, int64_t ldy, int64_t n) {
  const int64_t k = L.k;
  const __m512i off = _mm512_set1_epi32(L.mode == 0 ? L.offset : 0);
  const uint8_t* row[R];
  __m512 total[R][M];
  float corr[R][M];
  for (int r = 0; r < R; ++r) {
    row[r] = L.codes + (n + r) * L.row_bytes;
    for (int m = 0; m < M; ++m) { total[r][m] = _mm512_setzero_ps(); corr[r][m] = 0.f; }
  }
  for (int64_t g = 0; g < L.groups; ++g) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k0 = g * L.group; k0 < (g + 1) * L.group; k0 += 16) {
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(xf + m * k + k0);
      for (int r = 0; r < R; ++r) {
        __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + k0)));
        __m512 w = _mm512_cvtepi32_ps(_mm512_sub_epi32(u, off));
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float s = L.p.s(n + r, g);
      __m512 sv = _mm512_set1_ps(s);
      for (int m = 0; m < M; ++m) total[r][m] = _mm512_fmadd_ps(acc[r][m], sv, total[r][m]);
      if (L.mode == 1 || L.mode == 2) {
        float zc = L.mode == 1 ? s * L.p.z(n + r, g) : L.p.z(n + r, g);
        for (int m = 0; m < M; ++m) corr[r][m] += zc * xs[m * L.groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float b = bias ? bias[n + r] : 0.f;
    for (int m = 0; m < M; ++m) y[m * ldy + n + r] = _mm512_reduce_add_ps(total[r][m]) - corr[r][m] + b;
  }
}

// rows [a, e) in tiles of R weight rows (the remainder one at a time)
template <int M, int R, typename F1, typename FR>
void tiles(int64_t a, int64_t e, F1&& one, FR&& tile) {
  int64_t n = a;
  for (; n + R <= e; n += R) tile(n);
  for (; n < e; ++n) one(n);
}

template <typename F>
void over_rows(int64_t n, F&& f) {
  // ~4 chunks per thread so uneven cores balance; rows stay contiguous per task
  int64_t grain = std::max<int64_t>(16, (n / (4 * at::get_num_threads())) & ~int64_t(3));
  at::parallel_for(0, n, grain, f);
}

at::Tensor qmatmul(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& table,
                   const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                   int64_t bits, int64_t group, int64_t mode, int64_t offset) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, K]");
  const int64_t k = x_in.size(1), rows = x_in.size(0);
  Layer L = make_layer(qweight, scale, zero, bits, k, group, mode, offset);
  at::Tensor x = x_in.to(at::kFloat);
  if (perm.has_value()) x = x.index_select(1, *perm);
  x = x.contiguous();
  at::Tensor xs = (mode == 1 || mode == 2) ? at::empty({rows, L.groups}, at::kFloat) : at::empty({0}, at::kFloat);
  at::Tensor y = at::empty({rows, L.n}, at::kFloat);
  const float* bptr = nullptr;
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    bptr = b.data_ptr<float>();
  }
  const float* xf = x.data_ptr<float>();
  if (bits == 8) {
    if (xs.numel()) {
      auto xv = x.view({rows, L.groups, L.group}).sum(2);
      xs.copy_(xv);
    }
    for (int64_t m0 = 0; m0 < rows; m0 += 4) {
      int64_t mm = std::min<int64_t>(4, rows - m0);
      const float* xm = xf + m0 * k;
      const float* xsm = xs.numel() ? xs.data_ptr<float>() + m0 * L.groups : nullptr;
      float* ym = y.data_ptr<float>() + m0 * L.n;
      over_rows(L.n, [&](int64_t a, int64_t e) {
#define LOWBIT_U8(M_, R_) tiles<M_, R_>(a, e, [&](int64_t n) { gemv_u8<M_, 1>(L, xm, xsm, bptr, ym, L.n, n); }, \
                                        [&](int64_t n) { gemv_u8<M_, R_>(L, xm, xsm, bptr, ym, L.n, n); })
        switch (mm) {
          case 1: LOWBIT_U8(1, 4); break;
          case 2: LOWBIT_U8(2, 2); break;
          case 3: LOWBIT_U8(3, 2); break;
          default: LOWBIT_U8(4, 1);
        }
#undef LOWBIT_U8
      });
    }
  } else {
    // activations rounded to bf16 once; the zero-point correction uses the same rounded values
    at::Tensor xb16 = x.to(at::kBFloat16).contiguous();
    if (xs.numel()) xs.copy_(xb16.to(at::kFloat).view({rows, L.groups, L.group}).sum(2));
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(xb16.data_ptr<at::BFloat16>());
    Lut lut(lut_values(L, table));
    Unpack32 up(L.bits);
    for (int64_t m0 = 0; m0 < rows; m0 += 4) {
      int64_t mm = std::min<int64_t>(4, rows - m0);
      const uint16_t* xm = xb + m0 * k;
      const float* xsm = xs.numel() ? xs.data_ptr<float>() + m0 * L.groups : nullptr;
      float* ym = y.data_ptr<float>() + m0 * L.n;
      over_rows(L.n, [&](int64_t a, int64_t e) {
#define LOWBIT_LUT(M_, R_) tiles<M_, R_>(a, e, [&](int64_t n) { gemv_lut<M_, 1>(L, lut, up, xm, xsm, bptr, ym, L.n, n); }, \
                                         [&](int64_t n) { gemv_lut<M_, R_>(L, lut, up, xm, xsm, bptr, ym, L.n, n); })
        switch (mm) {
          case 1: LOWBIT_LUT(1, 8); break;
          case 2: LOWBIT_LUT(2, 4); break;
          case 3: LOWBIT_LUT(3, 2); break;
          default: LOWBIT_LUT(4, 1);
        }
#undef LOWBIT_LUT
      });
    }
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

inline void store_bf16x16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// the dense weight in bf16: w = (value(u) - zc) * s, or value(u) * s - z in mode 2
at::Tensor dequant(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                   const c10::optional<at::Tensor>& table, int64_t bits, int64_t k, int64_t group, int64_t mode,
                   int64_t offset) {
  Layer L = make_layer(qweight, scale, zero, bits, k, group, mode, offset);
  at::Tensor out = at::empty({L.n, k}, at::kBFloat16);
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  std::vector<float> vals = lut_values(L, table);
  if (bits == 8) {
    over_rows(L.n, [&](int64_t a, int64_t e) {
      for (int64_t n = a; n < e; ++n) {
        const uint8_t* row = L.codes + n * L.row_bytes;
        for (int64_t g = 0; g < L.groups; ++g) {
          float s = L.p.s(n, g);
          float z = L.mode == 1 ? L.p.z(n, g) * s : (L.mode == 2 ? L.p.z(n, g) : 0.f);
          float off = L.mode == 0 ? static_cast<float>(L.offset) : 0.f;
          __m512 sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(-off * s - z);
          for (int64_t k0 = g * L.group; k0 < (g + 1) * L.group; k0 += 16) {
            __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0)));
            store_bf16x16(o + n * k + k0, _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), sv, bv));
          }
        }
      }
    });
    return out;
  }
  Lut lut(vals);
  Unpack32 up(L.bits);
  const int64_t chunk_bytes = 4 * L.bits;
  const bool ftable = L.mode == 3;
  TORCH_CHECK(!ftable || L.bits <= 4, "codebooks of more than 16 entries are not supported");
  alignas(64) float tv[16] = {0};
  for (size_t i = 0; i < vals.size() && i < 16; ++i) tv[i] = vals[i];
  const __m512 tab = _mm512_load_ps(tv);
  over_rows(L.n, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; ++n) {
      const uint8_t* row = L.codes + n * L.row_bytes;
      for (int64_t g = 0; g < L.groups; ++g) {
        float s = L.p.s(n, g);
        float z = L.mode == 1 ? L.p.z(n, g) * s : (L.mode == 2 ? L.p.z(n, g) : 0.f);
        __m512 sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(-z);
        for (int64_t k0 = g * L.group; k0 < (g + 1) * L.group; k0 += 32) {
          __m512i c = up(row + (k0 / 32) * chunk_bytes);
          __m512 lo, hi;
          if (ftable) {  // codebooks: the fp32 table values (exact), 16 entries
            lo = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(c)), tab);
            hi = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c, 1)), tab);
          } else {  // integer values: exact in bf16
            __m512i w = lut(c);
            lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
            hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
          }
          store_bf16x16(o + n * k + k0, _mm512_fmadd_ps(lo, sv, bv));
          store_bf16x16(o + n * k + k0 + 16, _mm512_fmadd_ps(hi, sv, bv));
        }
      }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_supported", &cpu_supported, "whether this CPU has the instructions the kernels use");
  m.def("qmatmul", &qmatmul, "y = x @ W^T from packed codes (few rows)");
  m.def("dequant", &dequant, "dense bf16 weight from packed codes");
}
