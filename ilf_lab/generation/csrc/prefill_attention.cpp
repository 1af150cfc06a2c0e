// Prefill's causal attention (slots.SlotCache._layers), fp32 on CPU: prompt p's position i (after a held prefix of
// c positions) attends to keys [0, c + i], grouped-query heads reading their kv head's K and V in place.
//
// torch's scaled_dot_product_attention takes the prefix as an explicit mask, so it computes every query against
// every key (the masked half and the right padding included): ~2 x the causal FLOPs (session 16, refine prompts:
// 6.8 s of a 42 s prefill). Here a work item = (prompt, kv head, block of QB positions): the block's QB x g queries
// read the keys before the block together (attend.h: attend_wide, the queries in the vector lanes), then each
// position its own keys inside the block (attend). Nothing past a position, nor any padding, is computed. A
// query's arithmetic depends only on its prompt's inputs and its position, not on the batch or its padding.
#include "attend.h"

using namespace ilf;

namespace {
constexpr int64_t QB = 8;  // positions per work item: 8 x a group's heads fill whole vectors
}

extern "C" {

// q, out [b, t, kvh * g, hd] contiguous; k, v [b, kvh, c + t, hd] contiguous (the prefix's c positions first);
// lens [b]: prompt p's positions after the prefix (<= t; out is zero past them). Returns 0, 1 on arguments it cannot
// take, 2 when out of memory.
int ilf_prefill_attention(const float* q, float* out, const float* k, const float* v, const int64_t* lens, int64_t b,
                          int64_t t, int64_t c, int64_t kvh, int64_t g, int64_t hd, float scale, int64_t threads) {
  const Attenders forms = attenders_for(hd);
  const AttendFn attend = forms.attend;
  const WideFn wide = forms.wide;
  if (!attend || !wide || b < 0 || t < 0 || c < 0 || kvh < 1 || g < 1 || threads < 1) return 1;
  for (int64_t p = 0; p < b; ++p)
    if (lens[p] < 0 || lens[p] > t) return 1;
  const int64_t blocks = (t + QB - 1) / QB, heads = kvh * g, ctx = c + t;
  // later blocks read more keys: the dynamic schedule balances them
  return for_items(b * kvh * blocks, QB * g, hd, threads, 0, [&](Work& w, int64_t it) {
    const int64_t p = it / (kvh * blocks), h = it / blocks % kvh, i0 = it % blocks * QB;
    const int64_t nb = std::max<int64_t>(0, std::min(QB, lens[p] - i0)), end = std::min(QB, t - i0);
    auto at = [&](int64_t i, int64_t x) { return ((p * t + i0 + i) * heads + h * g + x) * hd; };
    for (int64_t i = nb; i < end; ++i) std::memset(out + at(i, 0), 0, sizeof(float) * g * hd);  // padding
    if (nb == 0) return;
    w.load_queries(nb * g, [&](int64_t y) { return q + at(y / g, y % g); }, scale, true);
    const int64_t kbase = (p * kvh + h) * ctx * hd;
    w.shared_keys(wide, k + kbase, v + kbase, c + i0);
    const int64_t diag = kbase + (c + i0) * hd;  // the block's own keys: position i reads i + 1 of them
    for (int64_t i = 0; i < nb; ++i) {
      attend(w.q + i * g * hd, w.st + i * g, g, k + diag, v + diag, i + 1, w.s, nullptr);
      for (int64_t x = 0; x < g; ++x) w.finish(i * g + x, out + at(i, x));
    }
  });
}

}  // extern "C"
