// One decode step's attention over the shared-prompt KV cache (prefix.SharedPromptCache), fp32 on CPU.
//
// Work item = (prompt slot p, kv head h). Its queries are the group's query heads of every row sampling from p:
// they read the prompt's keys together, one block of keys at a time while it sits in L1 (as the batched matmul
// over the grid shares the prompt's KV); then each row reads its own generated columns. Online softmax (running
// max, sum of exponentials, rescaled accumulator) over blocks of keys: no score tensor, no mask, no padding.
// Each row's result is computed in a fixed order from its own inputs only: it does not depend on the batch.
// GCC/Clang vector extensions (8 floats: AVX on x86, two NEON registers on arm64), a plain C ABI (loaded with
// ctypes, no torch headers, so it builds in about a second); threads: OpenMP, linked by soname to the libgomp
// torch has already loaded, so its thread pool is the one torch's own ops use (a second pool would spin against it).
#include <cstdlib>

#include "vec.h"

namespace {

constexpr int64_t BLOCK = 64;  // keys per block: 16 KB of K and of V at head_dim 64
using namespace ilf;

struct State {  // one query head of one row: running max, sum of exponentials, accumulator [hd]
  float m, l;
  float* acc;
};

// Attend queries q[0..nq) (rows of hd = 8 * C8 floats, pre-scaled) to keys and values [0, n) (rows of hd floats).
// The dot products run four keys at a time and the value sums keep all C8 accumulators in registers, so the
// FMAs form independent chains (one chain per dot product or per accumulator would wait on FMA latency).
template <int C8>
void attend(const float* q, State* st, int64_t nq, const float* k, const float* v, int64_t n) {
  constexpr int64_t hd = 8 * C8;
  alignas(32) float s[BLOCK + 8];
  for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
    const int64_t b = std::min(BLOCK, n - j0), b8 = (b + 7) / 8;
    const float* kb = k + j0 * hd;
    const float* vb = v + j0 * hd;
    for (int64_t x = 0; x < nq; ++x) {
      v8 qx[C8];
      for (int c = 0; c < C8; ++c) qx[c] = load(q + x * hd + 8 * c);
      int64_t j = 0;
      for (; j + 4 <= b; j += 4) {  // scores, four keys at a time
        const float* kj = kb + j * hd;
        v8 a0 = splat(0.f), a1 = splat(0.f), a2 = splat(0.f), a3 = splat(0.f);
        for (int c = 0; c < C8; ++c) {
          a0 += qx[c] * load(kj + 8 * c);
          a1 += qx[c] * load(kj + hd + 8 * c);
          a2 += qx[c] * load(kj + 2 * hd + 8 * c);
          a3 += qx[c] * load(kj + 3 * hd + 8 * c);
        }
        s[j] = hsum(a0), s[j + 1] = hsum(a1), s[j + 2] = hsum(a2), s[j + 3] = hsum(a3);
      }
      for (; j < b; ++j) {
        v8 a0 = splat(0.f);
        for (int c = 0; c < C8; ++c) a0 += qx[c] * load(kb + j * hd + 8 * c);
        s[j] = hsum(a0);
      }
      State& t = st[x];
      for (int64_t i = b; i < 8 * b8; ++i) s[i] = -3.0e38f;  // the last vector's unused lanes: exp -> 0
      v8 mx = load(s);
      for (int64_t i = 1; i < b8; ++i) mx = vmax(mx, load(s + 8 * i));
      const float top = std::max(t.m, hmax(mx));
      v8 acc[C8];
      for (int c = 0; c < C8; ++c) acc[c] = load(t.acc + 8 * c);
      if (top > t.m) {  // a new running max: rescale what was summed so far
        const float cf = exp_nonpos(splat(t.m - top))[0];
        t.l *= cf;
        for (int c = 0; c < C8; ++c) acc[c] *= splat(cf);
        t.m = top;
      }
      v8 sum = splat(0.f);
      for (int64_t i = 0; i < b8; ++i) {
        const v8 e = exp_nonpos(load(s + 8 * i) - splat(top));
        store(s + 8 * i, e);
        sum += e;
      }
      t.l += hsum(sum);
      for (int64_t i = 0; i < b; ++i) {  // values
        const v8 p = splat(s[i]);
        for (int c = 0; c < C8; ++c) acc[c] += p * load(vb + i * hd + 8 * c);
      }
      for (int c = 0; c < C8; ++c) store(t.acc + 8 * c, acc[c]);
    }
  }
}

using AttendFn = void (*)(const float*, State*, int64_t, const float*, const float*, int64_t);

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
    float* qs = static_cast<float*>(std::malloc(sizeof(float) * (2 * cap * hd + 1)));
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
      attend(qs, st, nq, pk + pbase, pv + pbase, plen[p]);
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = order[r0 + i], obase = r * os[0] + h * os[1];
        attend(qs + i * g * hd, st + i * g, g, ok + obase, ov + obase, own[r]);
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
