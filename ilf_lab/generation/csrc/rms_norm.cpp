// A decode step's residual add and the RMSNorm after it, in one pass per row (slots.SlotCache.decode), fp32 on CPU.
//
// torch runs them as six small ops per norm (add, cast, square, mean, rsqrt, two multiplies), each a dispatch and
// a pass over the [rows x hidden] activations: at a decode step's ~100 rows that overhead is most of the cost
// (2 norms per layer, 30 layers, every step). Here: x += delta (in place), then out = w * (x * 1/sqrt(mean(x^2) +
// eps)), the Llama-family RMSNorm's order of operations. Rows are independent and each is computed in a fixed order.
#include "vec.h"

extern "C" {

// x [rows, n] (updated in place when delta is not null), delta [rows, n] or null, w [n], out [rows, n]; all
// contiguous. Returns 0, or 1 on arguments it cannot take.
int ilf_add_rms_norm(float* x, const float* delta, const float* w, float* out, int64_t rows, int64_t n, float eps) {
  using namespace ilf;
  if (rows < 0 || n < 1 || !(eps >= 0.f)) return 1;
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * n;
    float* yr = out + r * n;
    const float* dr = delta ? delta + r * n : nullptr;
    v8 s0 = splat(0.f), s1 = s0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      v8 a = load(xr + j), b = load(xr + j + 8);
      if (dr) {
        a += load(dr + j), b += load(dr + j + 8);
        store(xr + j, a), store(xr + j + 8, b);
      }
      s0 += a * a, s1 += b * b;
    }
    float ss = hsum(s0 + s1);
    for (; j < n; ++j) {
      if (dr) xr[j] += dr[j];
      ss += xr[j] * xr[j];
    }
    const v8 inv = splat(1.f / __builtin_sqrtf(ss / static_cast<float>(n) + eps));
    for (j = 0; j + 8 <= n; j += 8) store(yr + j, load(w + j) * (load(xr + j) * inv));
    for (; j < n; ++j) yr[j] = w[j] * (xr[j] * inv[0]);
  }
  return 0;
}

}  // extern "C"
