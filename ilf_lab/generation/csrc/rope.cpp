// A decode step's rotary embedding and cache write after the q/k/v projections (slots.SlotCache.decode), fp32 on
// CPU.
//
// torch runs them as about twenty small ops per layer (views, transposes, rotate-half's slices, negation and
// concatenation, two multiplies and an add for q and again for k, two index copies into the cache), each a dispatch
// and a pass over the step's activations: at a decode step's ~100 rows, ~0.2 ms of a layer whose projections take
// ~2 ms. Here, per row: q and k rotated as x * cos + rotate_half(x) * sin with each product rounded before the sum,
// as torch rounds them (no FMA contraction: the result is bitwise torch's), q written out, k and v written into
// the layer's cache at the row's column.
#include <cstdint>
#include <cstring>

#if defined(__clang__)
#define ILF_NO_CONTRACT
#pragma clang fp contract(off)
#else
#define ILF_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif

namespace {

// out = x * c + rotate_half(x) * s over one head of hd floats, rotate_half(x) = [-x[half:], x[:half]]
ILF_NO_CONTRACT inline void rotate(const float* x, const float* c, const float* s, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d] * c[d], b = -x[d + half] * s[d];
    out[d] = a + b;
  }
  for (int64_t d = half; d < hd; ++d) {
    const float a = x[d] * c[d], b = x[d - half] * s[d];
    out[d] = a + b;
  }
}

}  // namespace

extern "C" {

// Row r's projections: q at qs + r * stride (heads x hd floats), k at ks + r * stride and v at vs + r * stride
// (kvh x hd each): three views of one fused projection, or three buffers with the same row stride. cos, sin
// [a, hd] contiguous. q_out [a, heads, hd] is written; kc and vc are the layer's K and V cache viewed as rows of hd
// floats, dst[r * kvh + h] the row that takes row r's head h. Returns 0, or 1 on arguments it cannot take.
ILF_NO_CONTRACT int ilf_rope_qkv(const float* qs, const float* ks, const float* vs, int64_t stride, const float* cos,
                                 const float* sin, float* q_out, float* kc, float* vc, const int64_t* dst, int64_t a,
                                 int64_t heads, int64_t kvh, int64_t hd) {
  if (a < 0 || heads < 1 || kvh < 1 || hd < 2 || hd % 2 || stride < 0) return 1;
  for (int64_t r = 0; r < a; ++r) {
    const float* c = cos + r * hd;
    const float* s = sin + r * hd;
    for (int64_t h = 0; h < heads; ++h) rotate(qs + r * stride + h * hd, c, s, q_out + (r * heads + h) * hd, hd);
    for (int64_t h = 0; h < kvh; ++h) {
      const int64_t row = dst[r * kvh + h];
      rotate(ks + r * stride + h * hd, c, s, kc + row * hd, hd);
      std::memcpy(vc + row * hd, vs + r * stride + h * hd, sizeof(float) * hd);
    }
  }
  return 0;
}

}  // extern "C"
