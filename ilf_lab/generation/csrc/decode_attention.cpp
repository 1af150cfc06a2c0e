// One decode step's attention over the shared-prompt KV cache (prefix.SharedPromptCache), fp32 on CPU.
//
// Work item = (prompt slot p, kv head h). Its queries are the group's query heads of every row sampling from p:
// they read the prompt's keys together, one block of keys at a time while it sits in L1 (as the batched matmul
// over the grid shares the prompt's KV); then each row reads its own generated columns. Online softmax (running
// max, sum of exponentials, rescaled accumulator) over blocks of keys: no score tensor, no mask, no padding.
// Scores and value sums run in register tiles of 3 queries (a row's group at SmolLM2's 9 / 3 heads) by 4 keys or
// 4 vectors, so each K and V load feeds three FMAs; a score's eight lanes are summed in a fixed tree (session 14:
// attention 1.17 x on refine prompts against one query at a time, results/sampling/README.md).
// Each row's result is computed in a fixed order from its own inputs only: it does not depend on the batch.
// GCC/Clang vector extensions (8 floats: AVX on x86, two NEON registers on arm64), a plain C ABI (loaded with
// ctypes, no torch headers, so it builds in about a second); threads: OpenMP, linked by soname to the libgomp
// torch has already loaded, so its thread pool is the one torch's own ops use (a second pool would spin against it).
#include <cstdlib>

#include "vec.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 64;  // keys per block: 16 KB of K and of V at head_dim 64
using namespace ilf;

struct State {  // one query head of one row: running max, sum of exponentials, accumulator [hd]
  float m, l;
  float* acc;
};

// The sums of four accumulators' lanes, each as ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), into s[0..4)
// (AVX: three horizontal adds and one add for all four; elsewhere the same order in scalars).
inline void sum4(v8 a0, v8 a1, v8 a2, v8 a3, float* s) {
#if defined(__AVX__)
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  const v8 a[4] = {a0, a1, a2, a3};
  for (int u = 0; u < 4; ++u)
    s[u] = ((a[u][0] + a[u][1]) + (a[u][2] + a[u][3])) + ((a[u][4] + a[u][5]) + (a[u][6] + a[u][7]));
#endif
}

// Scores of QT queries (rows of q, stride hd) against keys k0..k3: one vector FMA chain per (query, key) over the
// head dimension, its lanes summed by sum4; the same arithmetic for every query whatever QT is.
template <int C8, int QT>
inline void score_tile(const float* q, const float* k0, const float* k1, const float* k2, const float* k3, float* s) {
  constexpr int64_t hd = 8 * C8;
  v8 acc[QT][4];
  for (int x = 0; x < QT; ++x)
    for (int u = 0; u < 4; ++u) acc[x][u] = splat(0.f);
  for (int c = 0; c < C8; ++c) {
    const v8 w0 = load(k0 + 8 * c), w1 = load(k1 + 8 * c), w2 = load(k2 + 8 * c), w3 = load(k3 + 8 * c);
    for (int x = 0; x < QT; ++x) {
      const v8 qx = load(q + x * hd + 8 * c);
      acc[x][0] += qx * w0, acc[x][1] += qx * w1, acc[x][2] += qx * w2, acc[x][3] += qx * w3;
    }
  }
  for (int x = 0; x < QT; ++x) sum4(acc[x][0], acc[x][1], acc[x][2], acc[x][3], s + x * BLOCK);
}

// acc rows of queries [0, QV) += p x values, CW vectors of the head dimension from chunk c0: one FMA chain per
// accumulator lane over the keys in order, whatever QV is.
template <int C8, int QV, int CW>
inline void value_tile(const float* s, float* const* acc, const float* vb, int64_t b, int c0) {
  constexpr int64_t hd = 8 * C8;
  v8 a[QV][CW];
  for (int x = 0; x < QV; ++x)
    for (int c = 0; c < CW; ++c) a[x][c] = load(acc[x] + 8 * (c0 + c));
  for (int64_t i = 0; i < b; ++i) {
    v8 vv[CW];
    for (int c = 0; c < CW; ++c) vv[c] = load(vb + i * hd + 8 * (c0 + c));
    for (int x = 0; x < QV; ++x) {
      const v8 p = splat(s[x * BLOCK + i]);
      for (int c = 0; c < CW; ++c) a[x][c] += p * vv[c];
    }
  }
  for (int x = 0; x < QV; ++x)
    for (int c = 0; c < CW; ++c) store(acc[x] + 8 * (c0 + c), a[x][c]);
}

alignas(32) const float ZERO_ROW[128] = {};  // the missing keys of a block's last tile (scored, then masked)
static_assert(sizeof(ZERO_ROW) / sizeof(float) >= 8 * 16, "ZERO_ROW must cover the largest head size (attend_for)");

// Attend queries q[0..nq) (rows of hd = 8 * C8 floats, pre-scaled) to keys and values [0, n) (rows of hd floats), a
// block of keys at a time: scores in register tiles of 3 queries x 4 keys (K and q loads shared across the tile),
// each query's online-softmax update (running max, sum of exponentials, rescaled accumulator), then the values in
// tiles of 3 queries x 4 vectors. Each query's arithmetic is the same whatever nq and its place in a tile, so a
// row's result does not depend on the batch. s: nq * BLOCK floats of scratch.
template <int C8>
void attend(const float* q, State* st, int64_t nq, const float* k, const float* v, int64_t n, float* s) {
  constexpr int64_t hd = 8 * C8;
  constexpr int CW = C8 < 4 ? C8 : 4;
  for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
    const int64_t b = std::min(BLOCK, n - j0), b8 = (b + 7) / 8;
    const float* kb = k + j0 * hd;
    for (int64_t j = 0; j < b; j += 4) {
      const float* kr[4];
      for (int u = 0; u < 4; ++u) kr[u] = j + u < b ? kb + (j + u) * hd : ZERO_ROW;
      int64_t x = 0;
      for (; x + 3 <= nq; x += 3) score_tile<C8, 3>(q + x * hd, kr[0], kr[1], kr[2], kr[3], s + x * BLOCK + j);
      for (; x < nq; ++x) score_tile<C8, 1>(q + x * hd, kr[0], kr[1], kr[2], kr[3], s + x * BLOCK + j);
    }
    for (int64_t x = 0; x < nq; ++x) {  // online softmax: rescale to the new running max, exponentiate, sum
      float* sx = s + x * BLOCK;
      State& t = st[x];
      for (int64_t i = b; i < 8 * b8; ++i) sx[i] = -3.0e38f;  // the last vector's unused lanes: exp -> 0
      v8 mx = load(sx);
      for (int64_t i = 1; i < b8; ++i) mx = vmax(mx, load(sx + 8 * i));
      const float top = std::max(t.m, hmax(mx));
      if (top > t.m) {
        const v8 cf = splat(exp_nonpos(splat(t.m - top))[0]);
        t.l *= cf[0];
        for (int c = 0; c < C8; ++c) store(t.acc + 8 * c, load(t.acc + 8 * c) * cf);
        t.m = top;
      }
      v8 sum = splat(0.f);
      for (int64_t i = 0; i < b8; ++i) {
        const v8 e = exp_nonpos(load(sx + 8 * i) - splat(top));
        store(sx + 8 * i, e);
        sum += e;
      }
      t.l += hsum(sum);
    }
    const float* vb = v + j0 * hd;
    for (int64_t x = 0; x < nq;) {
      const int64_t left = nq - x;
      float* accs[3] = {st[x].acc, left > 1 ? st[x + 1].acc : nullptr, left > 2 ? st[x + 2].acc : nullptr};
      for (int c0 = 0; c0 < C8; c0 += CW) {
        if (left >= 3) value_tile<C8, 3, CW>(s + x * BLOCK, accs, vb, b, c0);
        else if (left == 2) value_tile<C8, 2, CW>(s + x * BLOCK, accs, vb, b, c0);
        else value_tile<C8, 1, CW>(s + x * BLOCK, accs, vb, b, c0);
      }
      x += std::min<int64_t>(left, 3);
    }
  }
}

using AttendFn = void (*)(const float*, State*, int64_t, const float*, const float*, int64_t, float*);

AttendFn attend_for(int64_t hd) {  // head sizes of the Llama family (SmolLM2: 64) and of the tests' tiny models
  switch (hd) {
    case 8: return attend<1>;
    case 16: return attend<2>;
    case 32: return attend<4>;
    case 64: return attend<8>;
    case 128: return attend<16>;
    default: return nullptr;
  }
}

}  // namespace

extern "C" {

// q [a, kvh, g, hd] and out (same shape), contiguous. pk, pv: one layer's prompt store, ps = its strides (slot,
// head) in floats, positions of hd contiguous floats; ok, ov, os: its own-column cache, likewise. order [a]: rows
// grouped by prompt slot, prompt p's rows being order[starts[p] .. starts[p + 1]). plen [m]: prompt lengths;
// own [a]: the own columns each row reads (this step's included). Returns 0, 1 on arguments it cannot take, 2 when
// out of memory.
int ilf_decode_attention(const float* q, float* out, const float* pk, const float* pv, const int64_t* ps,
                         const float* ok, const float* ov, const int64_t* os, const int64_t* order,
                         const int64_t* starts, const int64_t* plen, const int64_t* own, int64_t a, int64_t m,
                         int64_t kvh, int64_t g, int64_t hd, float scale, int64_t threads) {
  const AttendFn attend = attend_for(hd);
  if (!attend || a < 0 || m < 0 || kvh < 1 || g < 1 || threads < 1 || starts[0] != 0 || starts[m] != a) return 1;
  int64_t most = 0;  // rows of the prompt with the most
  for (int64_t p = 0; p < m; ++p) {
    if (starts[p + 1] < starts[p]) return 1;
    most = std::max(most, starts[p + 1] - starts[p]);
  }
  const int64_t items = m * kvh, cap = most * g;
  int failed = 0;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    // per thread: the item's queries (pre-scaled), accumulators and softmax states (malloc: no libstdc++)
    float* qs = static_cast<float*>(std::malloc(sizeof(float) * (2 * cap * hd + cap * BLOCK + 8)));
    State* st = static_cast<State*>(std::malloc(sizeof(State) * (cap + 1)));
    if (!qs || !st) {
#pragma omp atomic write
      failed = 2;
    }
    // dynamic: items differ in rows and prompt length; each item is one thread's, so results do not depend on it
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < items; ++t) {
      if (!qs || !st) continue;
      const int64_t p = t / kvh, h = t % kvh, r0 = starts[p], nr = starts[p + 1] - r0, nq = nr * g;
      float* accs = qs + cap * hd;
      std::memset(accs, 0, sizeof(float) * nq * hd);
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t x = 0; x < g; ++x) {
          const float* src = q + ((order[r0 + i] * kvh + h) * g + x) * hd;
          for (int64_t d = 0; d < hd; ++d) qs[(i * g + x) * hd + d] = src[d] * scale;
          st[i * g + x] = {-3.0e38f, 0.f, accs + (i * g + x) * hd};
        }
      const int64_t pbase = p * ps[0] + h * ps[1];
      float* scores = qs + 2 * cap * hd;
      attend(qs, st, nq, pk + pbase, pv + pbase, plen[p], scores);
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = order[r0 + i], obase = r * os[0] + h * os[1];
        attend(qs + i * g * hd, st + i * g, g, ok + obase, ov + obase, own[r], scores);
        for (int64_t x = 0; x < g; ++x) {
          const float inv = 1.f / st[i * g + x].l;
          float* dst = out + ((r * kvh + h) * g + x) * hd;
          for (int64_t d = 0; d < hd; ++d) dst[d] = st[i * g + x].acc[d] * inv;
        }
      }
    }
    std::free(qs);
    std::free(st);
  }
  return failed;
}

}  // extern "C"
