// One decode step's attention over the slots KV cache, on CPU: for each (row, kv head), the group's query heads
// against the row's own cache columns [0, lens[row]] only (no padding to the batch's longest row), softmax, and
// the weighted sum of V. One pass over K, one over V, no intermediate tensors; each (row, head) is computed on
// its own in a fixed order, so a row's result does not depend on the batch around it. Threads: ATen's pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

// q [a, kv_heads, group, head_dim] fp32 contiguous; k, v [slots, kv_heads, max_len, head_dim] fp32 (one layer,
// inner two dims contiguous); lens [a] int64. Returns [a, kv_heads, group, head_dim].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "decode_attention: fp32 tensors expected");
  TORCH_CHECK(q.is_contiguous() && lens.dtype() == torch::kInt64 && lens.is_contiguous(), "decode_attention: layout");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == q.size(3) && v.strides() == k.strides(), "decode_attention: cache layout");
  const int64_t a = q.size(0), heads = q.size(1), group = q.size(2), hd = q.size(3), max_len = k.size(2);
  TORCH_CHECK(lens.size(0) == a && k.size(0) >= a && k.size(1) == heads && k.size(3) == hd, "decode_attention: shapes");
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < a; ++r) TORCH_CHECK(len[r] >= 0 && len[r] < max_len, "decode_attention: lens out of range");
  auto out = torch::empty_like(q);
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t s_row = k.stride(0), s_head = k.stride(1);
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, a * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * max_len);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / heads, h = t % heads, n = len[r] + 1;
      const float* kr = K + r * s_row + h * s_head;
      const float* vr = V + r * s_row + h * s_head;
      const float* qt = Q + t * group * hd;
      float* ot = O + t * group * hd;
      for (int64_t j = 0; j < n; ++j) {
        const float* kj = kr + j * hd;
        for (int64_t x = 0; x < group; ++x) {
          const float* qx = qt + x * hd;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < hd; ++d) dot += qx[d] * kj[d];
          scores[x * max_len + j] = dot * fscale;
        }
      }
      for (int64_t x = 0; x < group; ++x) {
        float* sx = scores.data() + x * max_len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) m = sx[j] > m ? sx[j] : m;
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          sx[j] = std::exp(sx[j] - m);
          sum += sx[j];
        }
        const float inv = 1.f / sum;
        float* ox = ot + x * hd;
        for (int64_t d = 0; d < hd; ++d) ox[d] = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          const float p = sx[j] * inv;
          const float* vj = vr + j * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) ox[d] += p * vj[d];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention); }
