// The elementwise ends of lowbit's int8 layers (nn/int8_linear.py) in one pass each, bit-identical to
// lowbit.core.int8's torch ops (the same float32 operations in the same order):
//   quantize_rows_i8: per-row symmetric int8 codes, scale = max(max|x| / 127, 1e-12), q = round(x / scale)
//                     (round half to even), as core.int8.quantize_per_token;
//   rescale_i32:      y = float(acc + correction) * row_scale * col_scale + bias, as core.int8.rescale.
// The integer matmul between them stays torch._int_mm (oneDNN, VNNI/AMX).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <tuple>

namespace {

std::tuple<at::Tensor, at::Tensor> quantize_rows_i8(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, K]");
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor q = at::empty({m, k}, at::kChar);
  at::Tensor s = at::empty({m, 1}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t a, int64_t e) {
    for (int64_t r = a; r < e; ++r) {
      const float* row = xp + r * k;
      __m512 mx = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= k; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(row + j)));
      float amax = _mm512_reduce_max_ps(mx);
      for (; j < k; ++j) amax = std::max(amax, std::fabs(row[j]));
      const float scale = std::max(amax / 127.f, 1e-12f);
      sp[r] = scale;
      const __m512 sv = _mm512_set1_ps(scale);
      j = 0;
      for (; j + 16 <= k; j += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + j), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qp + r * k + j), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
      }
      for (; j < k; ++j) qp[r * k + j] = static_cast<int8_t>(std::nearbyint(row[j] / scale));
    }
  });
  return {q, s};
}

at::Tensor rescale_i32(const at::Tensor& acc_in, const c10::optional<at::Tensor>& row_scale, const at::Tensor& col_scale,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& correction) {
  TORCH_CHECK(acc_in.dim() == 2 && acc_in.scalar_type() == at::kInt, "acc must be int32 [M, N]");
  at::Tensor acc = acc_in.contiguous();
  const int64_t m = acc.size(0), n = acc.size(1);
  at::Tensor cs = col_scale.to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(cs.numel() == n, "col_scale must have N elements");
  at::Tensor rs, b, c;
  if (row_scale.has_value()) {
    rs = row_scale->to(at::kFloat).contiguous().reshape({-1});
    TORCH_CHECK(rs.numel() == m, "row_scale must have M elements");
  }
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous().reshape({-1});
  if (correction.has_value()) c = correction->to(at::kInt).contiguous().reshape({-1});
  at::Tensor y = at::empty({m, n}, at::kFloat);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* csp = cs.data_ptr<float>();
  const float* rsp = rs.defined() ? rs.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int32_t* cp = c.defined() ? c.data_ptr<int32_t>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t a, int64_t e) {
    for (int64_t r = a; r < e; ++r) {
      const __m512 rv = _mm512_set1_ps(rsp ? rsp[r] : 1.f);
      int64_t j = 0;
      for (; j + 16 <= n; j += 16) {
        __m512i iv = _mm512_loadu_si512(ap + r * n + j);
        if (cp) iv = _mm512_add_epi32(iv, _mm512_loadu_si512(cp + j));
        __m512 v = _mm512_cvtepi32_ps(iv);
        if (rsp) v = _mm512_mul_ps(v, rv);
        v = _mm512_mul_ps(v, _mm512_loadu_ps(csp + j));
        if (bp) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + j));
        _mm512_storeu_ps(yp + r * n + j, v);
      }
      for (; j < n; ++j) {
        float v = static_cast<float>(ap[r * n + j] + (cp ? cp[j] : 0));
        if (rsp) v = v * rsp[r];
        v = v * csp[j];
        if (bp) v = v + bp[j];
        yp[r * n + j] = v;
      }
    }
  });
  return y;
}

}  // namespace

void register_int8(pybind11::module& m) {
  m.def("quantize_rows_i8", &quantize_rows_i8, "per-row symmetric int8 codes and scales (core.int8.quantize_per_token)");
  m.def("rescale_i32", &rescale_i32, "float(acc + correction) * row_scale * col_scale + bias (core.int8.rescale)");
}
