// Temperature + top-p (nucleus) choice of one token per row of fp32 logits on CPU (sampling.choose_tokens).
//
// torch's path runs a decode step's [rows x vocab] logits through a divide, a softmax and a top-k as separate
// passes over memory (~15 ms per step at 95 rows x 49,152 on 2 cores). Here each row takes two passes: its max and
// its k largest logits (a running threshold: a vector compare per 8 logits, a rare insertion), then the sum of
// exponentials. The k candidates become probabilities in double, sorted most likely first (ties: lower token id
// first), and the token is chosen by inverse CDF over the nucleus as torch's path does (keep tokens while the mass
// before them is below top_p, at least one). A row whose nucleus needs more than k tokens, or whose logits are not
// finite, is left to torch's path (-1). Rows are independent and each is computed in a fixed order. Where the
// host has AVX-512 both passes run 16 lanes with the 8-lane form's arithmetic (the same sums, the same tokens).
#include <cmath>

#include "vec.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using namespace ilf;
constexpr int64_t MAX_K = 256;

// the k largest logits of x[0..n) (k <= n) and their indices, unordered; returns the max logit
float top_candidates(const float* x, int64_t n, int64_t k, float* val, int64_t* idx) {
  int64_t low = 0;  // the smallest candidate: the threshold a logit must beat
  float top = x[0];
  auto offer = [&](int64_t j) {  // x[j] replaces the smallest candidate if larger
    if (!(x[j] > val[low])) return;
    val[low] = x[j], idx[low] = j, top = std::max(top, x[j]);
    for (int64_t i = 0; i < k; ++i)
      if (val[i] < val[low]) low = i;
  };
  for (int64_t i = 0; i < k; ++i) {
    val[i] = x[i], idx[i] = i, top = std::max(top, x[i]);
    if (val[i] < val[low]) low = i;
  }
  int64_t j = k;
  for (; j < n && j % 8; ++j) offer(j);
  // a vector compare per W logits (most blocks hold no candidate), a filter only: offer() checks each logit in
  // order against the threshold as it stands, which only rises, so the candidates are the same at any W
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16)
    if (_mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), _mm512_set1_ps(val[low]), _CMP_GT_OQ))
      for (int u = 0; u < 16; ++u) offer(j + u);
#endif
  for (; j + 8 <= n; j += 8) {
    const i8 above = load(x + j) > splat(val[low]);
    bool any = false;
    for (int u = 0; u < 8; ++u) any |= above[u] != 0;
    if (any)
      for (int u = 0; u < 8; ++u) offer(j + u);
  }
  for (; j < n; ++j) offer(j);
  return top;
}

// sum over x of exp((x - top) * inv_t), four independent vector accumulators
float exp_sum(const float* x, int64_t n, float top, float inv_t) {
  v8 s0 = splat(0.f), s1 = s0, s2 = s0, s3 = s0;
  const v8 t = splat(top), it = splat(inv_t);
  int64_t j = 0;
#if defined(__AVX512F__)  // the same sums on 16 lanes: a = [s0 | s1], b = [s2 | s3]
  v16 a = splat_as<v16>(0.f), b = a;
  const v16 t16 = splat_as<v16>(top), it16 = splat_as<v16>(inv_t);
  for (; j + 32 <= n; j += 32) {
    a += exp_nonpos((load_as<v16>(x + j) - t16) * it16);
    b += exp_nonpos((load_as<v16>(x + j + 16) - t16) * it16);
  }
  s0 = low8(a), s1 = high8(a), s2 = low8(b), s3 = high8(b);
#endif
  for (; j + 32 <= n; j += 32) {
    s0 += exp_nonpos((load(x + j) - t) * it);
    s1 += exp_nonpos((load(x + j + 8) - t) * it);
    s2 += exp_nonpos((load(x + j + 16) - t) * it);
    s3 += exp_nonpos((load(x + j + 24) - t) * it);
  }
  for (; j + 8 <= n; j += 8) s0 += exp_nonpos((load(x + j) - t) * it);
  float sum = hsum((s0 + s1) + (s2 + s3));
  for (; j < n; ++j) sum += exp_nonpos(splat((x[j] - top) * inv_t))[0];
  return sum;
}

int64_t choose_row(const float* x, int64_t n, int64_t k, float inv_t, double top_p, double u) {
  float val[MAX_K];
  int64_t idx[MAX_K];
  const float top = top_candidates(x, n, k, val, idx);
  if (!std::isfinite(top)) return -1;
  const float z = exp_sum(x, n, top, inv_t);
  if (!(z >= 1.f) || !std::isfinite(z)) return -1;  // the max alone contributes 1; NaN fails too
  for (int64_t i = 1; i < k; ++i) {  // most likely first, ties by token id (insertion sort: k is small)
    const float v = val[i];
    const int64_t t = idx[i];
    int64_t j = i;
    for (; j > 0 && (val[j - 1] < v || (val[j - 1] == v && idx[j - 1] > t)); --j) val[j] = val[j - 1], idx[j] = idx[j - 1];
    val[j] = v, idx[j] = t;
  }
  double p[MAX_K], before = 0.0;  // the mass of the tokens before the next
  int64_t keep = 0;
  for (; keep < k && (keep == 0 || before < top_p); ++keep) {
    p[keep] = static_cast<double>(exp_nonpos(splat((val[keep] - top) * inv_t))[0]) / z;
    before += p[keep];
  }
  if (before < top_p) return -1;  // the nucleus reaches past the k candidates
  const double target = u * before;  // inverse CDF over the kept tokens' mass
  double cdf = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    cdf += p[i];
    if (cdf > target) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace

extern "C" {

// logits [rows, n] (row stride ld floats), uniforms u [rows], out [rows]: the chosen token, or -1 where torch's
// path decides (a nucleus wider than k, logits not finite). Returns 0, or 1 on arguments it cannot take.
int ilf_top_p(const float* logits, int64_t rows, int64_t n, int64_t ld, float temperature, double top_p,
              const double* u, int64_t k, int64_t* out, int64_t threads) {
  if (rows < 0 || n < 1 || ld < n || k < 1 || k > MAX_K || k > n || !(temperature > 0.f) || !(top_p > 0.0) ||
      !(top_p < 1.0) || threads < 1)
    return 1;
  const float inv_t = 1.f / temperature;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) out[r] = choose_row(logits + r * ld, n, k, inv_t, top_p, u[r]);
  return 0;
}

}  // extern "C"
