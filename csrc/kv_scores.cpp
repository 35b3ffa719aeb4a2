// Decode attention against stored TurboQuant codes (lowbit/kvcache/code_scoring.py calls these), built as
// its own extension lowbit._kv_scores.
//
// Built without global ISA flags: only the loops below are compiled for AVX2 + FMA (a target pragma) and
// chosen at run time, so the module imports on any x86-64 CPU and `supported()` says whether the loops
// can run (lowbit._cpu is compiled with -mavx512* for the whole file, module init included, and dies
// with SIGILL on import on a CPU without AVX-512).
//
// Codes: uint8 [B, H, N, R]: per token, dp codes of `bits` bits as lowbit.core.packing's uint8 bit
// stream (little-endian, least-significant bit first, no gaps), R = ceil(dp * bits / 8); the last axis
// contiguous, any strides on the others (a sliding layer's view of its newest tokens is not copied).
// Codes 8c .. 8c+7 fill bytes bits*c .. bits*c + bits - 1, so every 8-code chunk is byte-aligned: one
// 8-byte load, a byte shuffle that puts each code's bytes in its 32-bit lane, a per-lane shift and a
// mask give 8 codes; the codebook is the lookup table: vpermps from one register for <= 3 bits, two
// registers and a blend for 4, a gather above.
//
// kv_code_scores: out[b,h,g,t] = scale[b,h,t] * sum_j qrot[b,h,g,j] * levels[code(b,h,t,j)]
//   (qrot: the query rotated into the code frame once per step; each coordinate's product of the
//   rotated query with the looked-up codebook value); one pass over a kv head's codes serves all its
//   G query heads (GQA).
// kv_code_values: out[b,h,g,j] = sum_t w[b,h,g,t] * levels[code(b,h,t,j)]
//   (w: softmax weight x norm / sqrt(dp)); codebook-weighted sums per coordinate, the caller rotates
//   the [G, dp] result back once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

enum Lookup { PERM8 = 0, PERM16 = 1, GATHER = 2 };

int lookup_kind(int bits) { return bits <= 3 ? PERM8 : (bits == 4 ? PERM16 : GATHER); }

struct Rows {
  const uint8_t* data;
  const uint8_t* end;  // one past the tensor's last byte: 8-byte loads that stay below it are safe
  int64_t sb, sh, sn, row_bytes, dp, chunks;  // chunks of 8 codes per row
  int bits;
};

#pragma GCC push_options
#pragma GCC target("avx2,fma")

struct Unpacker {
  __m256i shuf, shift, mask;
  __m256 tab0, tab1;
  const float* levels;
  const uint8_t* end;
  int bits;
  int64_t row_bytes;
};

Unpacker make_unpacker(int bits, const float* lv, int64_t row_bytes, const uint8_t* end) {
  alignas(32) uint8_t p[32];
  alignas(32) int32_t s[8];
  for (int i = 0; i < 8; ++i) {
    const int bit = i * bits;
    for (int k = 0; k < 4; ++k) p[4 * i + k] = static_cast<uint8_t>(bit / 8 + k);  // per 128-bit half
    s[i] = bit % 8;
  }
  alignas(32) float t[16] = {0};
  for (int i = 0; i < std::min(1 << bits, 16); ++i) t[i] = lv[i];
  Unpacker U;
  U.shuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
  U.shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
  U.mask = _mm256_set1_epi32((1 << bits) - 1);
  U.tab0 = _mm256_load_ps(t);
  U.tab1 = _mm256_load_ps(t + 8);
  U.levels = lv;
  U.end = end;
  U.bits = bits;
  U.row_bytes = row_bytes;
  return U;
}

// codebook values of codes 8c .. 8c+7 of one row.  The 8-byte load may run past the row (into the next
// one): that only feeds lanes past the row's dp codes, which the callers zero (query) or drop (sums);
// only at the tensor's end are just the row's own bytes read.
template <int L>
inline __m256 values8(const Unpacker& U, const uint8_t* row, int64_t c) {
  const uint8_t* at = row + U.bits * c;
  uint64_t w = 0;
  if (at + 8 <= U.end) std::memcpy(&w, at, 8);
  else std::memcpy(&w, at, row + U.row_bytes - at);
  const __m256i raw = _mm256_broadcastsi128_si256(_mm_cvtsi64_si128(static_cast<long long>(w)));
  const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(raw, U.shuf), U.shift), U.mask);
  if (L == PERM8) return _mm256_permutevar8x32_ps(U.tab0, code);
  if (L == PERM16)
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(U.tab0, code), _mm256_permutevar8x32_ps(U.tab1, code),
                            _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));  // bit 3 -> sign: upper table
  return _mm256_i32gather_ps(U.levels, code, 4);
}

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// scores of tokens [t0, t1) of one (b, h) for GB query heads (q: [GB, chunks * 8], zero-padded); two tokens
// per iteration, so two independent FMA chains per head are in flight
template <int L, int GB>
void scores_block(const Rows& C, const Unpacker& U, const uint8_t* base, const float* q, const float* scale,
                  float* out, int64_t n, int64_t t0, int64_t t1) {
  const int64_t qs = C.chunks * 8;
  int64_t t = t0;
  for (; t + 1 < t1; t += 2) {
    const uint8_t* row0 = base + t * C.sn;
    const uint8_t* row1 = row0 + C.sn;
    __m256 a0[GB], a1[GB];
    for (int g = 0; g < GB; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C.chunks; ++c) {
      const __m256 v0 = values8<L>(U, row0, c), v1 = values8<L>(U, row1, c);
      for (int g = 0; g < GB; ++g) {
        const __m256 qg = _mm256_loadu_ps(q + g * qs + 8 * c);
        a0[g] = _mm256_fmadd_ps(qg, v0, a0[g]);
        a1[g] = _mm256_fmadd_ps(qg, v1, a1[g]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      out[g * n + t] = scale[t] * hsum(a0[g]);
      out[g * n + t + 1] = scale[t + 1] * hsum(a1[g]);
    }
  }
  for (; t < t1; ++t) {
    const uint8_t* row = base + t * C.sn;
    __m256 acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C.chunks; ++c) {
      const __m256 v = values8<L>(U, row, c);
      for (int g = 0; g < GB; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * qs + 8 * c), v, acc[g]);
    }
    for (int g = 0; g < GB; ++g) out[g * n + t] = scale[t] * hsum(acc[g]);
  }
}

template <int L>
void scores_heads(const Rows& C, const Unpacker& U, const uint8_t* base, const float* q, const float* scale,
                  float* out, int64_t n, int64_t G, int64_t t0, int64_t t1) {
  const int64_t qs = C.chunks * 8;
  for (int64_t g = 0; g < G; g += 4) {
    const float* qg = q + g * qs;
    float* og = out + g * n;
    switch (std::min<int64_t>(4, G - g)) {
      case 1: scores_block<L, 1>(C, U, base, qg, scale, og, n, t0, t1); break;
      case 2: scores_block<L, 2>(C, U, base, qg, scale, og, n, t0, t1); break;
      case 3: scores_block<L, 3>(C, U, base, qg, scale, og, n, t0, t1); break;
      default: scores_block<L, 4>(C, U, base, qg, scale, og, n, t0, t1);
    }
  }
}

void scores_avx2(const Rows& C, const float* levels, const float* q, const float* scale, float* out, int64_t n,
                 int64_t G, int64_t t0, int64_t t1, const uint8_t* base) {
  const Unpacker U = make_unpacker(C.bits, levels, C.row_bytes, C.end);
  switch (lookup_kind(C.bits)) {
    case PERM8: scores_heads<PERM8>(C, U, base, q, scale, out, n, G, t0, t1); break;
    case PERM16: scores_heads<PERM16>(C, U, base, q, scale, out, n, G, t0, t1); break;
    default: scores_heads<GATHER>(C, U, base, q, scale, out, n, G, t0, t1);
  }
}

// codebook-weighted sums of coordinates 8c .. 8c+7 of one (b, h) for GB query heads (out: [GB, chunks * 8]);
// even and odd tokens go to separate accumulators (two FMA chains per head)
template <int L, int GB>
void values_chunk(const Rows& C, const Unpacker& U, const uint8_t* base, const float* w, float* out, int64_t n,
                  int64_t c) {
  __m256 a0[GB], a1[GB];
  for (int g = 0; g < GB; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 1 < n; t += 2) {
    const uint8_t* row = base + t * C.sn;
    const __m256 v0 = values8<L>(U, row, c), v1 = values8<L>(U, row + C.sn, c);
    for (int g = 0; g < GB; ++g) {
      a0[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + g * n + t), v0, a0[g]);
      a1[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + g * n + t + 1), v1, a1[g]);
    }
  }
  if (t < n) {
    const __m256 v = values8<L>(U, base + t * C.sn, c);
    for (int g = 0; g < GB; ++g) a0[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + g * n + t), v, a0[g]);
  }
  for (int g = 0; g < GB; ++g) _mm256_storeu_ps(out + g * C.chunks * 8 + 8 * c, _mm256_add_ps(a0[g], a1[g]));
}

template <int L>
void values_heads(const Rows& C, const Unpacker& U, const uint8_t* base, const float* w, float* out, int64_t n,
                  int64_t G, int64_t c) {
  const int64_t os = C.chunks * 8;
  for (int64_t g = 0; g < G; g += 4) {
    const float* wg = w + g * n;
    float* og = out + g * os;
    switch (std::min<int64_t>(4, G - g)) {
      case 1: values_chunk<L, 1>(C, U, base, wg, og, n, c); break;
      case 2: values_chunk<L, 2>(C, U, base, wg, og, n, c); break;
      case 3: values_chunk<L, 3>(C, U, base, wg, og, n, c); break;
      default: values_chunk<L, 4>(C, U, base, wg, og, n, c);
    }
  }
}

void values_avx2(const Rows& C, const float* levels, const float* w, float* out, int64_t n, int64_t G, int64_t c,
                 const uint8_t* base) {
  const Unpacker U = make_unpacker(C.bits, levels, C.row_bytes, C.end);
  switch (lookup_kind(C.bits)) {
    case PERM8: values_heads<PERM8>(C, U, base, w, out, n, G, c); break;
    case PERM16: values_heads<PERM16>(C, U, base, w, out, n, G, c); break;
    default: values_heads<GATHER>(C, U, base, w, out, n, G, c);
  }
}

#pragma GCC pop_options

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

Rows check_codes(const at::Tensor& codes, int64_t bits, int64_t dp) {
  TORCH_CHECK(supported(), "kv_scores: this CPU lacks AVX2/FMA (use the pure-torch path)");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.stride(3) == 1,
              "codes must be uint8 [B, H, N, bytes] with the last axis contiguous");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be 1..8, got ", bits);
  TORCH_CHECK(dp >= 1 && codes.size(3) == (dp * bits + 7) / 8, "codes have ", codes.size(3),
              " bytes per row, expected ", (dp * bits + 7) / 8, " for ", dp, " codes of ", bits, " bits");
  const uint8_t* data = codes.data_ptr<uint8_t>();
  int64_t last = 0;  // offset of the last byte
  for (int i = 0; i < 4; ++i) last += (codes.size(i) - 1) * codes.stride(i);
  return {data, data + (codes.numel() ? last + 1 : 0), codes.stride(0), codes.stride(1), codes.stride(2),
          codes.size(3), dp, (dp + 7) / 8, static_cast<int>(bits)};
}

at::Tensor check_levels(const at::Tensor& levels, int64_t bits) {
  TORCH_CHECK(levels.dim() == 1 && levels.numel() == (int64_t{1} << bits), "levels must hold 2^bits values");
  return levels.to(at::kFloat).contiguous();
}

at::Tensor kv_code_scores(const at::Tensor& codes, const at::Tensor& qrot, const at::Tensor& scale,
                          const at::Tensor& levels_in, int64_t bits) {
  TORCH_CHECK(codes.dim() == 4 && qrot.dim() == 4, "codes must be [B, H, N, bytes] and qrot [B, H, G, dp]");
  const int64_t B = codes.size(0), H = codes.size(1), N = codes.size(2), G = qrot.size(2), dp = qrot.size(3);
  TORCH_CHECK(qrot.size(0) == B && qrot.size(1) == H, "qrot must be [B, H, G, dp] with the codes' B, H");
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == B && scale.size(1) == H && scale.size(2) == N,
              "scale must be [B, H, N]");
  const Rows C = check_codes(codes, bits, dp);
  const at::Tensor levels = check_levels(levels_in, bits);
  const int64_t padded = C.chunks * 8;  // the query padded with zeros: lanes past dp add nothing
  at::Tensor q = at::zeros({B, H, G, padded}, at::kFloat);
  q.narrow(3, 0, dp).copy_(qrot);
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, G, N}, at::kFloat);
  const int64_t block = 512, nblk = std::max<int64_t>((N + block - 1) / block, 1);
  const float* qp = q.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* lv = levels.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / nblk, blk = i % nblk, b = bh / H, h = bh % H;
      const int64_t t0 = blk * block, t1 = std::min(N, t0 + block);
      scores_avx2(C, lv, qp + bh * G * padded, sp + bh * N, op + bh * G * N, N, G, t0, t1,
                  C.data + b * C.sb + h * C.sh);
    }
  });
  return out;
}

at::Tensor kv_code_values(const at::Tensor& codes, const at::Tensor& weights, const at::Tensor& levels_in,
                          int64_t bits, int64_t dp) {
  TORCH_CHECK(codes.dim() == 4 && weights.dim() == 4, "codes must be [B, H, N, bytes] and weights [B, H, G, N]");
  const int64_t B = codes.size(0), H = codes.size(1), N = codes.size(2), G = weights.size(2);
  TORCH_CHECK(weights.size(0) == B && weights.size(1) == H && weights.size(3) == N,
              "weights must be [B, H, G, N] with the codes' B, H, N");
  const Rows C = check_codes(codes, bits, dp);
  const at::Tensor levels = check_levels(levels_in, bits);
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  const int64_t padded = C.chunks * 8;
  at::Tensor out = at::empty({B, H, G, padded}, at::kFloat);
  const float* wp = w.data_ptr<float>();
  const float* lv = levels.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H * C.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / C.chunks, c = i % C.chunks, b = bh / H, h = bh % H;
      values_avx2(C, lv, wp + bh * G * N, op + bh * G * padded, N, G, c, C.data + b * C.sb + h * C.sh);
    }
  });
  return padded == dp ? out : out.narrow(3, 0, dp).contiguous();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this CPU runs the kernels (AVX2 + FMA)");
  m.def("kv_code_scores", &kv_code_scores,
        "decode scores from packed TurboQuant key codes: scale[t] * qrot[g] . levels[codes[t]] ([B, H, G, N])");
  m.def("kv_code_values", &kv_code_values,
        "codebook-weighted sums of packed TurboQuant value codes: sum_t w[g, t] levels[codes[t]] ([B, H, G, dp])");
}
