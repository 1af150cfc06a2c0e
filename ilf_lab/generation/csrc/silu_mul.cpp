// A gated MLP's SiLU(gate) * up after its fused gate/up product (packed.PackedLinears.mlp), fp32 on CPU.
//
// torch runs it as two passes (a SiLU over the product's strided gate half into a new tensor, then the multiply):
// at a decode step's ~100 rows, ~0.25 ms of a layer whose MLP matmuls take ~9 ms. Here one pass per row, the
// sigmoid from exp(-|g|) (vec.h's exp_nonpos, ~1 ulp), so it never overflows: equal to torch's SiLU to float
// rounding. Rows are independent and each is computed in a fixed order, so a row's output does not depend on the
// batch or the thread count.
#include <cstring>

#include "vec.h"

namespace {

using namespace ilf;

inline v8 silu_mul8(v8 g, v8 u) {
  const v8 one = splat(1.f);
  const v8 e = exp_nonpos(g < 0 ? g : -g);  // exp(-|g|), in [0, 1]
  return g * ((g < 0 ? e : one) / (one + e)) * u;  // g * sigmoid(g) * u
}

}  // namespace

extern "C" {

// x [rows, 2f] contiguous: each row's gate (f floats), then its up (f floats); out [rows, f] contiguous. Returns 0,
// or 1 on arguments it cannot take.
int ilf_silu_mul(const float* x, float* out, int64_t rows, int64_t f, int64_t threads) {
  if (rows < 0 || f < 1 || threads < 1) return 1;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = x + r * 2 * f;
    const float* u = g + f;
    float* o = out + r * f;
    int64_t j = 0;
    for (; j + 8 <= f; j += 8) store(o + j, silu_mul8(load(g + j), load(u + j)));
    if (j < f) {  // the row's last floats, through the same vector arithmetic
      float gb[8] = {}, ub[8] = {}, ob[8];
      std::memcpy(gb, g + j, sizeof(float) * (f - j));
      std::memcpy(ub, u + j, sizeof(float) * (f - j));
      store(ob, silu_mul8(load(gb), load(ub)));
      std::memcpy(o + j, ob, sizeof(float) * (f - j));
    }
  }
  return 0;
}

}  // extern "C"
