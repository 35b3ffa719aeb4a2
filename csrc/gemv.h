#pragma once
// lowbit's CPU kernels: layouts, unpacking and the GEMV tiles (shared by qmatmul.cpp and decoder.cpp) (AVX-512 BW/VBMI/BF16; selected at run time by lowbit.nn.cpu_kernels).
//
// Weights: unsigned codes u of `bits` bits in one of these row layouts (lowbit/nn/cpu_layout.py
// writes them from a record; every row is a sequence of 64-code blocks, except U8):
//   GENERIC  lowbit.core.packing's little-endian bit stream (any bits 1..6): 32 codes per 4*bits bytes
//   B4       32 bytes per block: byte j = u[j] | u[j+32] << 4
//   B2       16 bytes per block: byte j = u[j] | u[j+16] << 2 | u[j+32] << 4 | u[j+48] << 6
//   B3       24 bytes per block: the B2 block of the low two bits, then 8 bytes whose bit i is bit 2 of u[i]
//   U8       one byte per code (8 bits)
// Scales / zeros per group ([N|1, G|1], float16, bfloat16 or float32):
//   mode 0  w = (u - offset) * s          symmetric int (offset = 2^(bits-1))
//   mode 1  w = (u - z) * s               asymmetric int, float zero point in code units
//   mode 2  w = u * s - z                 asymmetric int, zero in weight units (llama.cpp's min form)
//   mode 3  w = table[u] * s              4-bit codebooks (NF4, FP4)
//
// qmatmul: y[M, N] = x[M, K] @ W^T + bias for few rows (batch-1 decode). Codes are unpacked in
// registers and turned into exact bf16 values, (128 + u) by OR-ing in the exponent (int modes) or
// through a 16-entry lookup (codebooks); vdpbf16ps multiplies them with bf16 activations in fp32,
// each group's sum is scaled once, and the 128 is taken back out with the per-group activation sums.
// 8-bit codes take an fp32 path. Nothing dense is materialised.
// dequant: the dense bf16 weight [N, K] (prefill multiplies it with a bf16 GEMM).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lowbit_cpu {

enum Layout { GENERIC = 0, B4 = 1, B2 = 2, B3 = 3, U8 = 4 };

struct Layer {
  const uint8_t* codes;
  int64_t row_bytes, n, k, group, groups;
  int bits, mode, offset, layout;
  const void* scale;
  const void* zero;
  at::ScalarType sdtype;
  int64_t s_row, z_row;  // element strides between rows (0: one row shared); columns are contiguous
};

inline int64_t block_bytes(const Layer& L) {
  switch (L.layout) {
    case B4: return 32;
    case B2: return 16;
    case B3: return 24;
    default: return 8 * L.bits;
  }
}

inline Layer make_layer(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                 int64_t bits, int64_t layout, int64_t k, int64_t group, int64_t mode, int64_t offset) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "qweight must be contiguous [N, bytes]");
  TORCH_CHECK(layout >= GENERIC && layout <= U8, "unknown layout ", layout);
  TORCH_CHECK((layout == U8) == (bits == 8), "8-bit codes use layout U8 and only they do");
  TORCH_CHECK(layout != B4 || bits == 4, "layout B4 holds 4-bit codes");
  TORCH_CHECK(layout != B2 || bits == 2, "layout B2 holds 2-bit codes");
  TORCH_CHECK(layout != B3 || bits == 3, "layout B3 holds 3-bit codes");
  TORCH_CHECK(bits >= 1 && bits <= 8 && bits != 7, "bits must be 1..6 or 8");
  TORCH_CHECK(mode >= 0 && mode <= 3 && !(mode == 3 && bits != 4), "unsupported mode ", mode, " for ", bits, " bits");
  TORCH_CHECK(k % 64 == 0 && (group == 32 || group % 64 == 0) && k % group == 0,
              "K must be a multiple of 64 and the group 32 or a multiple of 64");
  Layer L;
  L.codes = static_cast<const uint8_t*>(qweight.data_ptr());
  L.n = qweight.size(0);
  L.row_bytes = qweight.numel() * qweight.element_size() / std::max<int64_t>(L.n, 1);
  TORCH_CHECK(L.row_bytes * 8 == k * bits, "qweight has ", L.row_bytes, " bytes per row, expected ", k * bits / 8);
  L.k = k;
  L.group = group;
  L.groups = k / group;
  L.bits = static_cast<int>(bits);
  L.mode = static_cast<int>(mode);
  L.offset = static_cast<int>(offset);
  L.layout = static_cast<int>(layout);
  auto st = scale.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, "scale must be float16, bfloat16 or float32");
  TORCH_CHECK(scale.dim() == 2 && scale.is_contiguous() && scale.size(1) == L.groups &&
                  (scale.size(0) == 1 || scale.size(0) == L.n),
              "scale must be contiguous [N|1, ", L.groups, "]");
  L.scale = scale.data_ptr();
  L.sdtype = st;
  L.s_row = scale.size(0) == 1 ? 0 : L.groups;
  L.zero = nullptr;
  L.z_row = 0;
  if (mode == 1 || mode == 2) {
    TORCH_CHECK(zero.has_value() && zero->scalar_type() == st && zero->sizes() == scale.sizes() && zero->is_contiguous(),
                "modes 1 and 2 need a contiguous zero with the scale's shape and dtype");
    L.zero = zero->data_ptr();
    L.z_row = L.s_row;
  }
  return L;
}

// ---- scales -------------------------------------------------------------------------------------
inline float load1(const void* base, at::ScalarType t, int64_t i) {
  switch (t) {
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

inline __m512 load16(const void* base, at::ScalarType t, int64_t i, int64_t count) {
  __mmask16 m = count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
  switch (t) {
    case at::kHalf:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i));
    case at::kBFloat16:
      return _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i)), 16));
    default: return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
  }
}

// ---- unpacking: a 64-code block -> two registers of 32 uint16 codes -----------------------------
struct Unpack {
  __m512i idx, shift, mask;  // GENERIC: per-lane byte gather + shift for 32 codes of `bits` bits
  __mmask64 load_mask;
  __m512i sh2a, sh2b, m2, m3, m4;
  explicit Unpack(int bits) {
    alignas(64) uint8_t id[64];
    alignas(64) uint16_t sh[32], a[32], b[32];
    for (int i = 0; i < 32; ++i) {
      int bit = i * bits;
      id[2 * i] = static_cast<uint8_t>(bit / 8);
      id[2 * i + 1] = static_cast<uint8_t>(bit / 8 + 1);
      sh[i] = static_cast<uint16_t>(bit % 8);
      a[i] = i < 16 ? 0 : 2;
      b[i] = i < 16 ? 4 : 6;
    }
    idx = _mm512_load_si512(id);
    shift = _mm512_load_si512(sh);
    mask = _mm512_set1_epi16(static_cast<int16_t>((1 << bits) - 1));
    load_mask = bits >= 8 ? ~0ULL : (1ULL << (4 * bits)) - 1;
    sh2a = _mm512_load_si512(a);
    sh2b = _mm512_load_si512(b);
    m2 = _mm512_set1_epi16(3);
    m3 = _mm512_set1_epi16(4);
    m4 = _mm512_set1_epi16(15);
  }
};

template <int LAYOUT>
inline void codes64(const Unpack& U, const uint8_t* p, __m512i& a, __m512i& b) {
  if constexpr (LAYOUT == B4) {
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    a = _mm512_and_si512(v, U.m4);
    b = _mm512_srli_epi16(v, 4);
  } else if constexpr (LAYOUT == B2 || LAYOUT == B3) {
    __m512i v = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    a = _mm512_and_si512(_mm512_srlv_epi16(v, U.sh2a), U.m2);
    b = _mm512_and_si512(_mm512_srlv_epi16(v, U.sh2b), U.m2);
    if constexpr (LAYOUT == B3) {
      uint32_t h[2];
      std::memcpy(h, p + 16, 8);
      a = _mm512_mask_add_epi16(a, static_cast<__mmask32>(h[0]), a, U.m3);
      b = _mm512_mask_add_epi16(b, static_cast<__mmask32>(h[1]), b, U.m3);
    }
  } else {  // GENERIC: two 32-code chunks of 4*bits bytes each
    const int half = _mm_popcnt_u64(U.load_mask);
    a = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(U.idx, _mm512_maskz_loadu_epi8(U.load_mask, p)), U.shift), U.mask);
    b = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(U.idx, _mm512_maskz_loadu_epi8(U.load_mask, p + half)), U.shift), U.mask);
  }
}

inline uint16_t to_bf16_bits(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

// the bf16 value of each code: 128 + u for int modes (exact, exponent OR-ed in), table[u] for codebooks
struct Values {
  __m512i magic, lut;
  bool table;
  Values(const Layer& L, const c10::optional<at::Tensor>& tab) {
    magic = _mm512_set1_epi16(0x4300);
    table = L.mode == 3;
    alignas(64) uint16_t t[32] = {0};
    if (table) {
      TORCH_CHECK(tab.has_value() && tab->numel() >= 16, "mode 3 needs a table of 16 values");
      auto tf = tab->to(at::kFloat).contiguous();
      for (int i = 0; i < 16; ++i) t[i] = to_bf16_bits(tf.data_ptr<float>()[i]);
    }
    lut = _mm512_load_si512(t);
  }
};

// ---- GEMV ---------------------------------------------------------------------------------------
inline void prefetch_rows(const Layer& L, int64_t n, int64_t rows) {  // the next tile, while this one computes
  if (n >= L.n) return;
  rows = std::min<int64_t>(rows, L.n - n);
  const char* p = reinterpret_cast<const char*>(L.codes + n * L.row_bytes);
  for (int64_t i = 0; i < rows * L.row_bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

// per-row correction: sum_g s_g * c0 * xs_g (+ s_g z_g xs_g in mode 1, + z_g xs_g in mode 2)
inline float correction(const Layer& L, int64_t n, const float* xs, float c0) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 c0v = _mm512_set1_ps(c0);
  for (int64_t g = 0; g < L.groups; g += 16) {
    int64_t cnt = std::min<int64_t>(16, L.groups - g);
    __m512 xv = _mm512_maskz_loadu_ps(cnt >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cnt) - 1), xs + g);
    __m512 sv = load16(L.scale, L.sdtype, n * L.s_row + g, cnt);
    if (L.mode == 1) {
      __m512 zv = load16(L.zero, L.sdtype, n * L.z_row + g, cnt);
      acc = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_add_ps(c0v, zv)), xv, acc);
    } else if (L.mode == 2) {
      __m512 zv = load16(L.zero, L.sdtype, n * L.z_row + g, cnt);
      acc = _mm512_fmadd_ps(_mm512_fmadd_ps(sv, c0v, zv), xv, acc);
    } else {
      acc = _mm512_fmadd_ps(_mm512_mul_ps(sv, c0v), xv, acc);
    }
  }
  return _mm512_reduce_add_ps(acc);
}

// y[m, n..n+R) for M activation rows and R weight rows at a time: R*M independent accumulator
// chains, one activation load serves R rows, scales come 16 groups per load. Everything indexed by
// r/m/h is unrolled at compile time so the accumulators and unpacked codes stay in registers.
// G32: groups of 32 codes (each half block closes a group); otherwise groups are multiples of 64.
#define LOWBIT_UNROLL _Pragma("GCC unroll 16")
template <int LAYOUT, bool TABLE, bool G32, int M, int R>
void gemv_tile(const Layer& L, const Unpack& U, const Values& V, const uint16_t* xb, const float* xs, float c0,
               const float* bias, float* y, int64_t ldy, int64_t n) {
  const int64_t k = L.k, bb = block_bytes(L), blocks_per_group = G32 ? 1 : L.group / 64;
  const __m512i magic = V.magic, lut = V.lut;
  const uint8_t* row[R];
  __m512 total[R][M], acc[R][M], sv[R];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
    row[r] = L.codes + (n + r) * L.row_bytes;
    LOWBIT_UNROLL for (int m = 0; m < M; ++m) total[r][m] = acc[r][m] = _mm512_setzero_ps();
  }
  prefetch_rows(L, n + R, R);
  int64_t g = 0, blk_in_group = 0;
  __m512i gidx = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  auto scales = [&]() {  // the scale of group g for each row, broadcast
    if ((g & 15) == 0) {
      const int64_t cnt = std::min<int64_t>(16, L.groups - g);
      LOWBIT_UNROLL for (int r = 0; r < R; ++r) sv[r] = load16(L.scale, L.sdtype, (n + r) * L.s_row + g, cnt);
      gidx = _mm512_setzero_si512();
    }
  };
  for (int64_t blk = 0; blk < k / 64; ++blk) {
    __m512i xv[2][M];
    LOWBIT_UNROLL for (int m = 0; m < M; ++m) {
      xv[0][m] = _mm512_loadu_si512(xb + m * k + blk * 64);
      xv[1][m] = _mm512_loadu_si512(xb + m * k + blk * 64 + 32);
    }
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      __m512i w[2];
      codes64<LAYOUT>(U, row[r] + blk * bb, w[0], w[1]);
      LOWBIT_UNROLL for (int h = 0; h < 2; ++h) {
        w[h] = TABLE ? _mm512_permutexvar_epi16(w[h], lut) : _mm512_or_si512(w[h], magic);
        LOWBIT_UNROLL for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w[h], (__m512bh)xv[h][m]);
        if (G32 && h == 0) {  // group 2*blk closes after the first half: flush with its scale
          if (r == 0) scales();
          const __m512 s = _mm512_permutexvar_ps(gidx, sv[r]);
          LOWBIT_UNROLL for (int m = 0; m < M; ++m) {
            total[r][m] = _mm512_fmadd_ps(acc[r][m], s, total[r][m]);
            acc[r][m] = _mm512_setzero_ps();
          }
        }
      }
    }
    if (G32) {  // the first half's group done; the second half's is flushed below
      gidx = _mm512_add_epi32(gidx, one);
      ++g;
    }
    if (G32 || ++blk_in_group == blocks_per_group) {
      scales();
      LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_permutexvar_ps(gidx, sv[r]);
        LOWBIT_UNROLL for (int m = 0; m < M; ++m) {
          total[r][m] = _mm512_fmadd_ps(acc[r][m], s, total[r][m]);
          acc[r][m] = _mm512_setzero_ps();
        }
      }
      gidx = _mm512_add_epi32(gidx, one);
      ++g;
      blk_in_group = 0;
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[n + r] : 0.f;
    LOWBIT_UNROLL for (int m = 0; m < M; ++m) {
      const float corr = (c0 != 0.f || L.mode == 1 || L.mode == 2) ? correction(L, n + r, xs + m * L.groups, c0) : 0.f;
      y[m * ldy + n + r] = _mm512_reduce_add_ps(total[r][m]) - corr + b;
    }
  }
}

// 8-bit codes: fp32 activations, codes widened to int32 -> fp32, 16 per step
template <int M, int R>
void gemv_u8(const Layer& L, const float* xf, const float* xs, const float* bias, float* y, int64_t ldy, int64_t n) {
  const int64_t k = L.k;
  const __m512i off = _mm512_set1_epi32(L.mode == 0 ? L.offset : 0);
  const uint8_t* row[R];
  __m512 total[R][M];
  for (int r = 0; r < R; ++r) {
    row[r] = L.codes + (n + r) * L.row_bytes;
    for (int m = 0; m < M; ++m) total[r][m] = _mm512_setzero_ps();
  }
  prefetch_rows(L, n + R, R);
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
      __m512 s = _mm512_set1_ps(load1(L.scale, L.sdtype, (n + r) * L.s_row + g));
      for (int m = 0; m < M; ++m) total[r][m] = _mm512_fmadd_ps(acc[r][m], s, total[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float b = bias ? bias[n + r] : 0.f;
    for (int m = 0; m < M; ++m) {
      float corr = (L.mode == 1 || L.mode == 2) ? correction(L, n + r, xs + m * L.groups, 0.f) : 0.f;
      y[m * ldy + n + r] = _mm512_reduce_add_ps(total[r][m]) - corr + b;
    }
  }
}

template <typename F>
void over_rows(int64_t n, int64_t align, F&& f) {
  // ~4 chunks per thread so uneven cores balance; chunk starts stay multiples of the tile height
  int64_t grain = std::max<int64_t>(16, n / (4 * at::get_num_threads()));
  grain = (grain + align - 1) / align * align;
  at::parallel_for(0, n, grain, f);
}

template <int M, int R, typename Tile1, typename TileR>
void tiles(int64_t a, int64_t e, Tile1&& one, TileR&& many) {
  int64_t n = a;
  for (; n + R <= e; n += R) many(n);
  for (; n < e; ++n) one(n);
}

template <int LAYOUT, bool TABLE, bool G32, int M, int R>
void run_tiles(const Layer& L, const Unpack& U, const Values& V, const uint16_t* xb, const float* xs, float c0,
               const float* bias, float* y) {
  over_rows(L.n, R, [&](int64_t a, int64_t e) {
    tiles<M, R>(a, e, [&](int64_t n) { gemv_tile<LAYOUT, TABLE, G32, M, 1>(L, U, V, xb, xs, c0, bias, y, L.n, n); },
                [&](int64_t n) { gemv_tile<LAYOUT, TABLE, G32, M, R>(L, U, V, xb, xs, c0, bias, y, L.n, n); });
  });
}

template <int LAYOUT, int M, int R>
void run_lut(const Layer& L, const Unpack& U, const Values& V, const uint16_t* xb, const float* xs, float c0,
             const float* bias, float* y) {
  const bool g32 = L.group == 32;
  if (V.table) {
    if (g32) run_tiles<LAYOUT, true, true, M, R>(L, U, V, xb, xs, c0, bias, y);
    else run_tiles<LAYOUT, true, false, M, R>(L, U, V, xb, xs, c0, bias, y);
  } else {
    if (g32) run_tiles<LAYOUT, false, true, M, R>(L, U, V, xb, xs, c0, bias, y);
    else run_tiles<LAYOUT, false, false, M, R>(L, U, V, xb, xs, c0, bias, y);
  }
}

template <int LAYOUT>
void run_layout(const Layer& L, const Unpack& U, const Values& V, const uint16_t* xb, const float* xs, float c0,
                const float* bias, float* y, int64_t mm) {
  switch (mm) {
    case 1: run_lut<LAYOUT, 1, 4>(L, U, V, xb, xs, c0, bias, y); break;
    case 2: run_lut<LAYOUT, 2, 2>(L, U, V, xb, xs, c0, bias, y); break;
    case 3: run_lut<LAYOUT, 3, 2>(L, U, V, xb, xs, c0, bias, y); break;
    default: run_lut<LAYOUT, 4, 1>(L, U, V, xb, xs, c0, bias, y);
  }
}

// y[rows, N] = x[rows, K] @ W^T + bias for activations already in column order (fp32, contiguous).
// Scratch: the bf16 copy of x and per-group sums, sized rows*K and rows*groups (caller-owned).
inline void gemv_rows(const Layer& L, const Unpack& U, const Values& V, const float* x, int64_t rows,
                      const float* bptr, float* yp, uint16_t* xb_scratch, float* xs_scratch) {
  const int64_t k = L.k;
  float* xs = xs_scratch;
  if (L.layout == U8) {
    for (int64_t i = 0; i < rows * L.groups; ++i) {
      const float* p = x + i * L.group;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < L.group; j += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(p + j));
      xs[i] = _mm512_reduce_add_ps(acc);
    }
    for (int64_t m0 = 0; m0 < rows; m0 += 4) {
      const int64_t mm = std::min<int64_t>(4, rows - m0);
      const float *xm = x + m0 * k, *xsm = xs + m0 * L.groups;
      float* ym = yp + m0 * L.n;
      over_rows(L.n, 4, [&](int64_t a, int64_t e) {
#define LOWBIT_U8(M_) tiles<M_, 4>(a, e, [&](int64_t n) { gemv_u8<M_, 1>(L, xm, xsm, bptr, ym, L.n, n); }, \
                                   [&](int64_t n) { gemv_u8<M_, 4>(L, xm, xsm, bptr, ym, L.n, n); })
        switch (mm) {
          case 1: LOWBIT_U8(1); break;
          case 2: LOWBIT_U8(2); break;
          case 3: LOWBIT_U8(3); break;
          default: LOWBIT_U8(4);
        }
#undef LOWBIT_U8
      });
    }
    return;
  }
  // activations rounded to bf16 once; the per-group sums use the same rounded values
  uint16_t* xb = xb_scratch;
  for (int64_t i = 0; i < rows * k; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + i), (__m256i)_mm512_cvtneps_pbh(v));
  }
  for (int64_t i = 0; i < rows * L.groups; ++i) {
    const uint16_t* p = xb + i * L.group;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < L.group; j += 16)
      acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j))), 16)));
    xs[i] = _mm512_reduce_add_ps(acc);
  }
  const float c0 = L.mode == 3 ? 0.f : (L.mode == 0 ? 128.f + L.offset : 128.f);
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const int64_t mm = std::min<int64_t>(4, rows - m0);
    const uint16_t* xm = xb + m0 * k;
    const float* xsm = xs + m0 * L.groups;
    float* ym = yp + m0 * L.n;
    switch (L.layout) {
      case B4: run_layout<B4>(L, U, V, xm, xsm, c0, bptr, ym, mm); break;
      case B2: run_layout<B2>(L, U, V, xm, xsm, c0, bptr, ym, mm); break;
      case B3: run_layout<B3>(L, U, V, xm, xsm, c0, bptr, ym, mm); break;
      default: run_layout<GENERIC>(L, U, V, xm, xsm, c0, bptr, ym, mm);
    }
  }
}

}  // namespace lowbit_cpu
