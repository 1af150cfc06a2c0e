// Vector helpers shared by the CPU kernels (decode_attention.cpp, top_p.cpp): GCC/Clang vector extensions of
// 8 floats (AVX on x86, two NEON registers on arm64) and a vectorised exp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace ilf {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline v8 load(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 vmax(v8 a, v8 b) { return a > b ? a : b; }
inline float hmax(v8 v) { return std::max(std::max(std::max(v[0], v[4]), std::max(v[1], v[5])), std::max(std::max(v[2], v[6]), std::max(v[3], v[7]))); }
inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// exp for x <= 0 (a score minus its running max): 2^n p(r), r = x - n ln2, |r| <= ln2 / 2, with Cephes' expf
// polynomial (~1 ulp); 0 below -87, where expf underflows anyway.
inline v8 exp_nonpos(v8 x) {
  const v8 lo = splat(-87.0f);
  const i8 under = x < lo;
  x = under ? lo : x;
  const v8 big = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const v8 n = (x * splat(1.44269504088896341f) + big) - big;
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  i8 bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += __builtin_convertvector(n, i8) << 23;
  bits = under ? i8{} : bits;  // 0.0f
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

}  // namespace ilf
