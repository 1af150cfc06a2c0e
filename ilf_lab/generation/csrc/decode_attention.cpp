// One decode step's attention over the shared-prompt KV cache (prefix.SharedPromptCache), fp32 on CPU.
//
// Work item = (prompt slot p, kv head h). Its queries are the group's query heads of every row sampling from p:
// they read the prompt's keys together, one block of keys at a time while it sits in L1 (as the batched matmul
// over the grid shares the prompt's KV; attend.h `attend_blocked`: the store's keys are blocked, each block of 64
// positions transposed, so scores need no horizontal sums); then each row reads its own generated columns, held as
// rows (`attend`). Both run 16 lanes on AVX-512 (8 at head_dim 8).
// Online softmax (running max, sum of exponentials, rescaled accumulator) over blocks of keys: no score tensor and
// no mask in memory (only the last block's unused lanes are masked, in registers). Each row's result is computed in a fixed order from its own inputs only: it does not depend on
// the batch. (attend.h's `attend_wide` is not used here: a prompt's live rows fall to a few as its samples end,
// leaving most of its lanes empty; on session 16's refine benchmark it was no faster.)
// A plain C ABI (loaded with ctypes, no torch headers, so it builds in about a second); threads: OpenMP, linked by
// soname to the libgomp torch has already loaded, so its thread pool is the one torch's own ops use (a second pool
// would spin against it).
#include "attend.h"

using namespace ilf;

extern "C" {

// q [a, kvh, g, hd] and out (same shape), contiguous. pk, pv: one layer's prompt store, ps = its strides (slot,
// head) in floats; pk's positions in blocks of 64, each [hd][64] (attention.py keys_blocked), pv's as rows of hd
// floats. ok, ov, os: its own-column cache, likewise, both as rows. order [a]: rows grouped by prompt slot, prompt
// p's rows being order[starts[p] .. starts[p + 1]). plen [m]: prompt lengths;
// own [a]: the own columns each row reads (this step's included). Returns 0, 1 on arguments it cannot take, 2 when
// out of memory.
int ilf_decode_attention(const float* q, float* out, const float* pk, const float* pv, const int64_t* ps,
                         const float* ok, const float* ov, const int64_t* os, const int64_t* order,
                         const int64_t* starts, const int64_t* plen, const int64_t* own, int64_t a, int64_t m,
                         int64_t kvh, int64_t g, int64_t hd, float scale, int64_t threads) {
  const Attenders forms = attenders_for(hd);
  const AttendFn attend = forms.decode, prompt = forms.prompt;
  if (!attend || !prompt || a < 0 || m < 0 || kvh < 1 || g < 1 || threads < 1 || starts[0] != 0 || starts[m] != a) return 1;
  int64_t most = 0, blocks = 0;  // rows of the prompt with the most; blocks of the longest prompt
  for (int64_t p = 0; p < m; ++p) {
    if (starts[p + 1] < starts[p] || plen[p] < 0) return 1;
    most = std::max(most, starts[p + 1] - starts[p]);
    blocks = std::max(blocks, (plen[p] + BLOCK - 1) / BLOCK);
  }
  return for_items(m * kvh, most * g, hd, threads, 2 * (blocks + most), [&](Work& w, int64_t t) {
    const int64_t p = t / kvh, h = t % kvh, r0 = starts[p], nr = starts[p + 1] - r0, pbase = p * ps[0] + h * ps[1];
    if (nr == 0) return;  // a hole: a slot no row samples from
    const auto query = [&](int64_t y) { return q + ((order[r0 + y / g] * kvh + h) * g + y % g) * hd; };
    // Everything the item reads after its first block of keys, in order, prefetched by the forms' score loops as
    // they go (attend.h Ahead): the prompt's blocks (V, then the next K), then each row's own K and V, each a
    // separate 16-64 KB run too short for the hardware prefetcher to ramp up on.
    Ahead& ah = w.ahead;
    ah.clear();
    for (int64_t j0 = 0; j0 < plen[p]; j0 += BLOCK) {
      if (j0 > 0) ah.add(pk + pbase + j0 * hd, BLOCK * hd);  // blocked keys: whole blocks
      ah.add(pv + pbase + j0 * hd, std::min(BLOCK, plen[p] - j0) * hd);
    }
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = order[r0 + i], obase = r * os[0] + h * os[1];
      ah.add(ok + obase, own[r] * hd), ah.add(ov + obase, own[r] * hd);
    }
    w.load_queries(nr * g, query, scale, false);
    prompt(w.q, w.st, nr * g, pk + pbase, pv + pbase, plen[p], w.s, &ah);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = order[r0 + i], obase = r * os[0] + h * os[1];
      attend(w.q + i * g * hd, w.st + i * g, g, ok + obase, ov + obase, own[r], w.s, &ah);
      for (int64_t x = 0; x < g; ++x) w.finish(i * g + x, out + ((r * kvh + h) * g + x) * hd);
    }
  });
}

}  // extern "C"
