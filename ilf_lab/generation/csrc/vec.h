// Vector helpers shared by the CPU kernels (decode_attention.cpp, top_p.cpp): GCC/Clang vector extensions of
// 8 floats (AVX on x86, two NEON registers on arm64), of 16 where the host has AVX-512 (attend.h), and a
// vectorised exp for either.
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

typedef float v16 __attribute__((vector_size(64)));

// Width-generic forms (V: v8 or v16); on v8 the same arithmetic as the helpers above.
template <typename V> constexpr int lanes = sizeof(V) / sizeof(float);
template <typename V> inline V splat_as(float x);  // one broadcast (a per-lane loop compiles to 16 masked ones)
template <> inline v8 splat_as<v8>(float x) { return splat(x); }
template <> inline v16 splat_as<v16>(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
template <typename V> inline V load_as(const float* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
// a v16's halves (memcpy, not __builtin_shufflevector, which GCC has only from 12; compiled to one extract)
inline v8 low8(v16 v) { v8 h; std::memcpy(&h, &v, sizeof h); return h; }
inline v8 high8(v16 v) { v8 h; std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof h, sizeof h); return h; }
inline float hmax(v16 v) { return hmax(vmax(low8(v), high8(v))); }  // fixed trees: halves first, then as v8's
inline float hsum(v16 v) { return hsum(low8(v) + high8(v)); }
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// exp for x <= 0 (a score minus its running max): 2^n p(r), r = x - n ln2, |r| <= ln2 / 2, with Cephes' expf
// polynomial (~1 ulp); 0 below -87, where expf underflows anyway.
template <typename V>
inline V exp_nonpos(V x) {
  using I = decltype(x < x);  // the lanes' int vector
  const V lo = splat_as<V>(-87.0f);
  const I under = x < lo;
  x = under ? lo : x;
  const V big = splat_as<V>(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const V n = (x * splat_as<V>(1.44269504088896341f) + big) - big;
  V r = x - n * splat_as<V>(0.693359375f);
  r = r - n * splat_as<V>(-2.12194440e-4f);
  V p = splat_as<V>(1.9875691500e-4f);
  p = p * r + splat_as<V>(1.3981999507e-3f);
  p = p * r + splat_as<V>(8.3334519073e-3f);
  p = p * r + splat_as<V>(4.1665795894e-2f);
  p = p * r + splat_as<V>(1.6666665459e-1f);
  p = p * r + splat_as<V>(5.0000001201e-1f);
  p = p * r * r + r + splat_as<V>(1.0f);
  I bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += __builtin_convertvector(n, I) << 23;
  bits = under ? I{} : bits;  // 0.0f
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

}  // namespace ilf
