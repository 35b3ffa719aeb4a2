// lowbit's decode step: one token through every block of a Llama-family decoder in one call, so a
// token costs the GEMVs and a few vector loops instead of ~60 framework ops per block.
//
// Per block: RMSNorm -> fused q/k/v GEMV -> RoPE (cos/sin tables, one row per position) -> K/V
// written at `pos` into the float16 caches (keys [blocks, kv_heads, head_dim, max_len], so the scores of
// 16 positions are one vector of FMAs; values [blocks, kv_heads, max_len, head_dim]) -> attention of
// each query head over positions 0..pos (its KV head: head / (heads / kv_heads)) -> o GEMV +
// residual -> RMSNorm -> fused gate/up GEMV -> silu(gate) * up -> down GEMV + residual.
// The Python side (lowbit/runtime/decoder.py) builds it from QuantLinear layers, fills the cache
// during prefill, and applies the final norm and the head.
#include <pybind11/stl.h>

#include <cmath>
#include <memory>

#include "gemv.h"

namespace {
using namespace lowbit_cpu;

// e^x for x <= 0 (softmax, silu of any sign via e^-|x|): 2^(x log2 e) = 2^n * e^(f ln 2), |f| <= 1/2
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  x = _mm512_min_ps(x, _mm512_set1_ps(87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

struct QLin {
  std::vector<at::Tensor> keep;  // the tensors the pointers below read
  Layer L;
  Unpack U;
  Values V;
  const int32_t* perm = nullptr;
  const float* bias = nullptr;
  QLin(const at::Tensor& qw, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
       const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& perm_t,
       const c10::optional<at::Tensor>& bias_t, int64_t bits, int64_t layout, int64_t k, int64_t group,
       int64_t mode, int64_t offset)
      : L(make_layer(qw, scale, zero, bits, layout, k, group, mode, offset)), U(static_cast<int>(bits)), V(L, table) {
    keep = {qw, scale};
    if (zero.has_value()) keep.push_back(*zero);
    if (perm_t.has_value()) {
      keep.push_back(perm_t->to(at::kInt).contiguous());
      perm = keep.back().data_ptr<int32_t>();
    }
    if (bias_t.has_value()) {
      keep.push_back(bias_t->to(at::kFloat).contiguous());
      bias = keep.back().data_ptr<float>();
    }
  }
  // y = W x (+ bias); scratch: xp [K] for the permuted input, xb [K], xs [K/32]
  void run(const float* x, float* y, float* xp, uint16_t* xb, float* xs) const {
    const float* in = x;
    if (perm) {
      for (int64_t i = 0; i < L.k; ++i) xp[i] = x[perm[i]];
      in = xp;
    }
    gemv_rows(L, U, V, in, 1, bias, y, xb, xs);
  }
};

struct Block {
  at::Tensor ln1, ln2;  // float32 [hidden]
  int qkv, o, gate_up, down;
};

class Decoder {
 public:
  Decoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, double eps,
          at::Tensor cos, at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), d_(head_dim), inter_(inter), eps_(static_cast<float>(eps)),
        cos_(cos.to(at::kFloat).contiguous()), sin_(sin.to(at::kFloat).contiguous()), k_(k_cache), v_(v_cache) {
    TORCH_CHECK(hidden % 16 == 0 && head_dim % 32 == 0 && inter % 16 == 0 && heads % kv_heads == 0,
                "hidden and intermediate sizes must be multiples of 16, head_dim of 32");
    TORCH_CHECK(k_.scalar_type() == at::kHalf && v_.scalar_type() == at::kHalf && k_.is_contiguous() &&
                    v_.is_contiguous() && k_.dim() == 4 && v_.dim() == 4 && k_.size(1) == kv_heads &&
                    k_.size(2) == head_dim && v_.size(3) == head_dim && v_.size(2) == k_.size(3) &&
                    k_.size(3) % 16 == 0 && head_dim <= 256,
                "the KV caches must be contiguous float16, keys [blocks, kv_heads, head_dim, max_len] and values "
                "[blocks, kv_heads, max_len, head_dim], max_len a multiple of 16, head_dim at most 256");
    max_len_ = k_.size(3);
    TORCH_CHECK(cos_.size(0) >= max_len_ && cos_.size(1) == head_dim, "cos/sin must be [max_len, head_dim]");
    const int64_t widest = std::max({hidden, inter, heads * head_dim});
    xp_.resize(widest);
    xb_.resize(widest);
    xs_.resize(widest / 32 + 1);
    x_.resize(hidden);
    qkv_.resize((heads + 2 * kv_heads) * head_dim);
    att_.resize(heads * head_dim);
    gu_.resize(2 * inter);
    tmp_.resize(std::max(hidden, inter));
    scores_.resize(heads * max_len_);
  }

  int64_t add_linear(const at::Tensor& qw, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                     const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& perm,
                     const c10::optional<at::Tensor>& bias, int64_t bits, int64_t layout, int64_t k, int64_t group,
                     int64_t mode, int64_t offset) {
    lins_.push_back(std::make_unique<QLin>(qw, scale, zero, table, perm, bias, bits, layout, k, group, mode, offset));
    return static_cast<int64_t>(lins_.size()) - 1;
  }

  void add_block(const at::Tensor& ln1, const at::Tensor& ln2, int64_t qkv, int64_t o, int64_t gate_up, int64_t down) {
    const int64_t q_rows = (heads_ + 2 * kv_heads_) * d_;
    TORCH_CHECK(lins_.at(qkv)->L.n == q_rows && lins_.at(qkv)->L.k == hidden_, "q/k/v layer has the wrong shape");
    TORCH_CHECK(lins_.at(o)->L.n == hidden_ && lins_.at(o)->L.k == heads_ * d_, "o layer has the wrong shape");
    TORCH_CHECK(lins_.at(gate_up)->L.n == 2 * inter_ && lins_.at(gate_up)->L.k == hidden_, "gate/up has the wrong shape");
    TORCH_CHECK(lins_.at(down)->L.n == hidden_ && lins_.at(down)->L.k == inter_, "down layer has the wrong shape");
    TORCH_CHECK(static_cast<int64_t>(blocks_.size()) < k_.size(0), "more blocks than the cache holds");
    blocks_.push_back({ln1.to(at::kFloat).contiguous(), ln2.to(at::kFloat).contiguous(), static_cast<int>(qkv),
                       static_cast<int>(o), static_cast<int>(gate_up), static_cast<int>(down)});
  }

  // h: float32 [hidden], the embedded token at position `pos` (0 < pos < max_len; the prompt was
  // prefilled into the cache); returns the hidden state after the last block (before the final norm)
  at::Tensor step(const at::Tensor& h_in, int64_t pos) {
    TORCH_CHECK(h_in.scalar_type() == at::kFloat && h_in.numel() == hidden_, "h must be float32 [hidden]");
    TORCH_CHECK(pos >= 0 && pos < max_len_, "position ", pos, " outside the cache of ", max_len_);
    at::Tensor h = h_in.contiguous().clone();
    float* hp = h.data_ptr<float>();
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& b = blocks_[i];
      rms(hp, b.ln1.data_ptr<float>(), x_.data());
      lin(b.qkv, x_.data(), qkv_.data());
      rope_and_store(static_cast<int64_t>(i), pos);
      attend(static_cast<int64_t>(i), pos);
      lin(b.o, att_.data(), tmp_.data());
      add(hp, tmp_.data(), hidden_);
      rms(hp, b.ln2.data_ptr<float>(), x_.data());
      lin(b.gate_up, x_.data(), gu_.data());
      silu_mul(gu_.data(), gu_.data() + inter_, tmp_.data());
      lin(b.down, tmp_.data(), x_.data());
      add(hp, x_.data(), hidden_);
    }
    return h;
  }

 private:
  void lin(int idx, const float* x, float* y) { lins_[idx]->run(x, y, xp_.data(), xb_.data(), xs_.data()); }

  void rms(const float* h, const float* w, float* out) const {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < hidden_; i += 16) {
      __m512 v = _mm512_loadu_ps(h + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) / hidden_ + eps_));
    for (int64_t i = 0; i < hidden_; i += 16)
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(h + i), r)));
  }

  static void add(float* h, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(h + i, _mm512_add_ps(_mm512_loadu_ps(h + i), _mm512_loadu_ps(y + i)));
  }

  void silu_mul(const float* g, const float* u, float* out) const {  // silu(g) * u = g * u / (1 + e^-g)
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t i = 0; i < inter_; i += 16) {
      __m512 gv = _mm512_loadu_ps(g + i);
      __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
  }

  // HF's rotate_half RoPE: x' = x * cos + [-x2, x1] * sin with x = [x1, x2] halves
  void rope(float* x, const float* c, const float* s) const {
    const int64_t half = d_ / 2;
    for (int64_t i = 0; i < half; i += 16) {
      __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + half + i);
      _mm512_storeu_ps(x + i, _mm512_fmsub_ps(a, _mm512_loadu_ps(c + i), _mm512_mul_ps(b, _mm512_loadu_ps(s + i))));
      _mm512_storeu_ps(x + half + i,
                       _mm512_fmadd_ps(b, _mm512_loadu_ps(c + half + i), _mm512_mul_ps(a, _mm512_loadu_ps(s + half + i))));
    }
  }

  void rope_and_store(int64_t layer, int64_t pos) {
    const float* c = cos_.data_ptr<float>() + pos * d_;
    const float* s = sin_.data_ptr<float>() + pos * d_;
    float* q = qkv_.data();
    float* k = q + heads_ * d_;
    float* v = k + kv_heads_ * d_;
    for (int64_t hh = 0; hh < heads_; ++hh) rope(q + hh * d_, c, s);
    uint16_t* kc = reinterpret_cast<uint16_t*>(k_.data_ptr<at::Half>());
    uint16_t* vc = reinterpret_cast<uint16_t*>(v_.data_ptr<at::Half>());
    alignas(64) uint16_t kh[256];
    for (int64_t g = 0; g < kv_heads_; ++g) {
      rope(k + g * d_, c, s);
      const int64_t base = (layer * kv_heads_ + g) * max_len_ * d_;
      for (int64_t j = 0; j < d_; j += 16) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(kh + j),
                           _mm512_cvtps_ph(_mm512_loadu_ps(k + g * d_ + j), _MM_FROUND_TO_NEAREST_INT));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vc + base + pos * d_ + j),
                            _mm512_cvtps_ph(_mm512_loadu_ps(v + g * d_ + j), _MM_FROUND_TO_NEAREST_INT));
      }
      for (int64_t t = 0; t < d_; ++t) kc[base + t * max_len_ + pos] = kh[t];
    }
  }

  static __m512 half16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

  void attend(int64_t layer, int64_t pos) {
    switch (d_ / 16) {
      case 2: attend_n<2>(layer, pos); break;
      case 4: attend_n<4>(layer, pos); break;
      case 8: attend_n<8>(layer, pos); break;
      case 16: attend_n<16>(layer, pos); break;
      default: TORCH_CHECK(false, "head_dim ", d_, " is not 32, 64, 128 or 256");
    }
  }

  // softmax(q K^T / sqrt(d)) V for each query head; NC = head_dim / 16 vectors per head
  template <int NC>
  void attend_n(int64_t layer, int64_t pos) {
    const int64_t n = pos + 1, group = heads_ / kv_heads_, blocks16 = (n + 15) / 16;
    const float scale = 1.f / std::sqrt(static_cast<float>(d_));
    const uint16_t* kc = reinterpret_cast<const uint16_t*>(k_.data_ptr<at::Half>());
    const uint16_t* vc = reinterpret_cast<const uint16_t*>(v_.data_ptr<at::Half>());
    at::parallel_for(0, heads_, 1, [&](int64_t a, int64_t e) {
      for (int64_t hh = a; hh < e; ++hh) {
        const int64_t base = (layer * kv_heads_ + hh / group) * max_len_ * d_;
        const float* q = qkv_.data() + hh * d_;
        float* sc = scores_.data() + hh * max_len_;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t b = 0; b < blocks16; ++b) {  // 16 positions: sum over t of q[t] * K[t][j..j+16)
          const uint16_t* kb = kc + base + b * 16;
          __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
          for (int64_t t = 0; t < d_; t += 2) {
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(q[t]), half16(kb + t * max_len_), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_set1_ps(q[t + 1]), half16(kb + (t + 1) * max_len_), acc1);
          }
          __m512 s = _mm512_mul_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(scale));
          const int64_t left = n - b * 16;
          if (left < 16) s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), static_cast<__mmask16>((1u << left) - 1), s);
          _mm512_storeu_ps(sc + b * 16, s);
          mx = _mm512_max_ps(mx, s);
        }
        const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 tot = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks16; ++b) {
          __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + b * 16), mv));
          p = _mm512_maskz_mov_ps(static_cast<__mmask16>(n - b * 16 >= 16 ? 0xFFFF : (1u << (n - b * 16)) - 1), p);
          _mm512_storeu_ps(sc + b * 16, p);
          tot = _mm512_add_ps(tot, p);
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(tot));
        __m512 acc[NC];
        LOWBIT_UNROLL for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {  // out += p_j V[j]
          const __m512 p = _mm512_set1_ps(sc[j]);
          const uint16_t* vr = vc + base + j * d_;
          LOWBIT_UNROLL for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(p, half16(vr + 16 * c), acc[c]);
        }
        float* out = att_.data() + hh * d_;
        LOWBIT_UNROLL for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
      }
    });
  }

  int64_t hidden_, heads_, kv_heads_, d_, inter_, max_len_;
  float eps_;
  at::Tensor cos_, sin_, k_, v_;
  std::vector<std::unique_ptr<QLin>> lins_;
  std::vector<Block> blocks_;
  std::vector<float> xp_, xs_, x_, qkv_, att_, gu_, tmp_, scores_;
  std::vector<uint16_t> xb_;
};

}  // namespace

void register_decoder(pybind11::module& m) {
  pybind11::class_<Decoder>(m, "Decoder", "one token through every block of a Llama-family decoder (decoder.cpp)")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor>())
      .def("add_linear", &Decoder::add_linear)
      .def("add_block", &Decoder::add_block)
      .def("step", &Decoder::step);
}
