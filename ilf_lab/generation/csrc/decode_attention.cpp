// One decode step's attention over the shared-prompt KV cache (prefix.SharedPromptCache), fp32 on CPU.
//
// Work item = (prompt slot p, kv head h). Its queries are the group's query heads of every row sampling from p:
// they read the prompt's keys together, one block of keys at a time while it sits in L1 (as the batched matmul
// over the grid shares the prompt's KV); then each row reads its own generated columns (attend.h `attend`, both;
// 16 lanes on AVX-512).
// Online softmax (running max, sum of exponentials, rescaled accumulator) over blocks of keys: no score tensor, no
// mask, no padding. Each row's result is computed in a fixed order from its own inputs only: it does not depend on
// the batch. (attend.h's `attend_wide` is not used here: a prompt's live rows fall to a few as its samples end,
// leaving most of its lanes empty; on session 16's refine benchmark it was no faster.)
// A plain C ABI (loaded with ctypes, no torch headers, so it builds in about a second); threads: OpenMP, linked by
// soname to the libgomp torch has already loaded, so its thread pool is the one torch's own ops use (a second pool
// would spin against it).
#include "attend.h"

using namespace ilf;

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
  const AttendFn attend = attenders_for(hd).decode;
  if (!attend || a < 0 || m < 0 || kvh < 1 || g < 1 || threads < 1 || starts[0] != 0 || starts[m] != a) return 1;
  int64_t most = 0;  // rows of the prompt with the most
  for (int64_t p = 0; p < m; ++p) {
    if (starts[p + 1] < starts[p]) return 1;
    most = std::max(most, starts[p + 1] - starts[p]);
  }
  return for_items(m * kvh, most * g, hd, threads, [&](Work& w, int64_t t) {
    const int64_t p = t / kvh, h = t % kvh, r0 = starts[p], nr = starts[p + 1] - r0;
    const auto query = [&](int64_t y) { return q + ((order[r0 + y / g] * kvh + h) * g + y % g) * hd; };
    w.load_queries(nr * g, query, scale, false);
    const int64_t pbase = p * ps[0] + h * ps[1];
    attend(w.q, w.st, nr * g, pk + pbase, pv + pbase, plen[p], w.s);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = order[r0 + i], obase = r * os[0] + h * os[1];
      attend(w.q + i * g * hd, w.st + i * g, g, ok + obase, ov + obase, own[r], w.s);
      for (int64_t x = 0; x < g; ++x) w.finish(i * g + x, out + ((r * kvh + h) * g + x) * hd);
    }
  });
}

}  // extern "C"
