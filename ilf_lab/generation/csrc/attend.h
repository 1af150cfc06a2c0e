// Online-softmax attention of a group of queries over blocks of keys, fp32 on CPU, shared by the decode kernel
// (decode_attention.cpp) and the prefill kernel (prefill_attention.cpp).
//
// Three forms. `attend`: queries as rows, scores in register tiles of 3 queries x 4 keys whose lanes (8, or 16 in
// the decode kernel on AVX-512) are summed in a fixed tree; any number of queries. `attend_blocked` (the decode
// kernel's prompt part): the same over keys stored in transposed blocks, the keys in the lanes, so no horizontal
// sums and a block's scores stay in registers through the softmax. `attend_wide`: queries transposed into the
// vector lanes (8 per vector), scores in tiles of 4 keys x 3 query vectors with no horizontal sums and the softmax
// over 8 queries at once; for many queries sharing their keys (prefill: a block of 8 positions x a group's heads
// against the keys before it). In-cache, at 21 queries a prompt, its scores took 0.30 ms against 0.39 and its
// softmax 0.14 against 0.19 (session 16). In all three a query's arithmetic is the same whatever the number of
// queries and its place in a tile or lane, so a row's result does not depend on the batch. GCC/Clang vector
// extensions (vec.h: 8 floats, AVX on x86, two NEON registers on arm64; the decode kernel's forms on 16 where the
// host has AVX-512: attenders_for).
#pragma once
#include <cstdlib>

#include "vec.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace ilf {

constexpr int64_t BLOCK = 64;  // keys per block: 16 KB of K and of V at head_dim 64

struct State {  // one query head of one row: running max, sum of exponentials, accumulator [hd]
  float m, l;
  float* acc;
};

// Prefetches of the memory a work item will read, in the order it reads it (regions added by the kernel), a cache
// line at a time towards L2, issued from the forms' score loops exactly as fast as they consume K and V (`pace`:
// so many lines over so many steps): a few lines per step among the FMAs keep the reads about one block ahead,
// where a burst of a block's 512 lines at its start stalls on the core's outstanding misses (session 22, decode
// kernel from memory: 1.28-1.36 x; pulling twice as fast was 13-17 % slower, half as fast 43-58 %).
struct Ahead {
  struct Region {
    const float* p;
    int64_t lines;
  };
  Region* r = nullptr;  // capacity: Work::init's `regions`
  int64_t n = 0, i = 0, line = 0;  // regions; the next line to fetch: region i, its line `line`
  int64_t num = 0, den = 1, credit = 0;  // num lines every den steps; lines owed x den

  void clear() { n = i = line = credit = 0; }
  void add(const float* p, int64_t floats) {
    if (floats > 0) r[n++] = {p, (floats + 15) / 16};
  }
  void pace(int64_t lines, int64_t steps) { num = lines, den = std::max<int64_t>(1, steps); }
  void tick() {  // one step of a score loop: the lines it has earned
    for (credit += num; credit >= den && i < n; credit -= den) {
      __builtin_prefetch(r[i].p + 16 * line, 0, 2);
      if (++line == r[i].lines) ++i, line = 0;
    }
  }
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

// The same for 16 lanes: each accumulator's halves added, then as sum4 of the four sums.
inline void sum4(v16 a0, v16 a1, v16 a2, v16 a3, float* s) {
  sum4(low8(a0) + high8(a0), low8(a1) + high8(a1), low8(a2) + high8(a2), low8(a3) + high8(a3), s);
}

// Scores of QT queries (rows of q, stride hd) against keys k0..k3: one vector FMA chain per (query, key) over the
// head dimension (C vectors V of W lanes), its lanes summed by sum4; the same arithmetic for every query whatever QT.
template <typename V, int C, int QT>
inline void score_tile(const float* q, const float* k0, const float* k1, const float* k2, const float* k3, float* s,
                       Ahead* ah) {
  constexpr int W = lanes<V>;
  constexpr int64_t hd = W * C;
  V acc[QT][4];
  for (int x = 0; x < QT; ++x)
    for (int u = 0; u < 4; ++u) acc[x][u] = splat_as<V>(0.f);
  for (int c = 0; c < C; ++c) {
    if (ah) ah->tick();
    const V w0 = load_as<V>(k0 + W * c), w1 = load_as<V>(k1 + W * c), w2 = load_as<V>(k2 + W * c),
            w3 = load_as<V>(k3 + W * c);
    for (int x = 0; x < QT; ++x) {
      const V qx = load_as<V>(q + x * hd + W * c);
      acc[x][0] += qx * w0, acc[x][1] += qx * w1, acc[x][2] += qx * w2, acc[x][3] += qx * w3;
    }
  }
  for (int x = 0; x < QT; ++x) sum4(acc[x][0], acc[x][1], acc[x][2], acc[x][3], s + x * BLOCK);
}

// acc rows of queries [0, QV) += p x values, CW vectors V of the head dimension from chunk c0, where query x's
// probability of key i is s[x * qs + i * ks]: one FMA chain per accumulator lane over the keys in order, whatever QV.
template <typename V, int C, int QV, int CW>
inline void value_tile(const float* s, int64_t qs, int64_t ks, float* const* acc, const float* vb, int64_t b, int c0) {
  constexpr int W = lanes<V>;
  constexpr int64_t hd = W * C;
  V a[QV][CW];
  for (int x = 0; x < QV; ++x)
    for (int c = 0; c < CW; ++c) a[x][c] = load_as<V>(acc[x] + W * (c0 + c));
  for (int64_t i = 0; i < b; ++i) {
    V vv[CW];
    for (int c = 0; c < CW; ++c) vv[c] = load_as<V>(vb + i * hd + W * (c0 + c));
    for (int x = 0; x < QV; ++x) {
      const V p = splat_as<V>(s[x * qs + i * ks]);
      for (int c = 0; c < CW; ++c) a[x][c] += p * vv[c];
    }
  }
  for (int x = 0; x < QV; ++x)
    for (int c = 0; c < CW; ++c) store(acc[x] + W * (c0 + c), a[x][c]);
}

// Every query's accumulator acc[x] (x < nq) += its probabilities (s, strides as value_tile's) x the block's b values
// vb, in tiles of QV queries x 4 vectors, then of 3 (fewer at the end); acc_at(x): query x's accumulator.
template <typename V, int C, int QV = 3, typename AccAt>
inline void add_values(const float* s, int64_t qs, int64_t ks, AccAt acc_at, int64_t nq, const float* vb, int64_t b) {
  constexpr int CW = C < 4 ? C : 4;
  int64_t x = 0;
  for (; x + QV <= nq; x += QV) {
    float* acc[QV];
    for (int y = 0; y < QV; ++y) acc[y] = acc_at(x + y);
    for (int c0 = 0; c0 < C; c0 += CW) value_tile<V, C, QV, CW>(s + x * qs, qs, ks, acc, vb, b, c0);
  }
  for (; x < nq; x += 3) {
    const int64_t left = nq - x;
    float* const acc[3] = {acc_at(x), left > 1 ? acc_at(x + 1) : nullptr, left > 2 ? acc_at(x + 2) : nullptr};
    for (int c0 = 0; c0 < C; c0 += CW) {
      if (left >= 3) value_tile<V, C, 3, CW>(s + x * qs, qs, ks, acc, vb, b, c0);
      else if (left == 2) value_tile<V, C, 2, CW>(s + x * qs, qs, ks, acc, vb, b, c0);
      else value_tile<V, C, 1, CW>(s + x * qs, qs, ks, acc, vb, b, c0);
    }
  }
}

// A query's state moved to the larger of its running max and a block's largest score: its sum and accumulator
// rescaled by exp(old - new) when the max rises. Returns the new max.
template <typename V, int C>
inline float raise_max(State& t, float block_max) {
  constexpr int W = lanes<V>;
  const float top = std::max(t.m, block_max);
  if (top > t.m) {
    const V cf = splat_as<V>(exp_nonpos(splat(t.m - top))[0]);
    t.l *= cf[0];
    for (int c = 0; c < C; ++c) store(t.acc + W * c, load_as<V>(t.acc + W * c) * cf);
    t.m = top;
  }
  return top;
}

alignas(32) inline const float ZERO_ROW[128] = {};  // the missing keys of a block's last tile (scored, then masked)
static_assert(sizeof(ZERO_ROW) / sizeof(float) >= 8 * 16, "ZERO_ROW must cover the largest head size (attenders_for)");

// Attend queries q[0..nq) (rows of hd floats, pre-scaled) to keys and values [0, n) (rows of hd floats), a
// block of keys at a time: scores in register tiles of 3 queries x 4 keys (K and q loads shared across the tile),
// each query's online-softmax update (running max, sum of exponentials, rescaled accumulator), then the values in
// tiles of 3 queries x 4 vectors. Each query's arithmetic is the same whatever nq and its place in a tile, so a
// row's result does not depend on the batch. V: v8, or v16 on AVX-512 (attenders_for); hd = C vectors of W lanes.
// s: nq * BLOCK floats of scratch. ah: prefetches pulled as fast as the keys and values are read (or nullptr).
template <typename V, int C>
void attend(const float* q, State* st, int64_t nq, const float* k, const float* v, int64_t n, float* s, Ahead* ah) {
  constexpr int W = lanes<V>;
  constexpr int64_t hd = W * C;
  static_assert(BLOCK % W == 0, "a block's scores must fill whole vectors");
  if (ah) ah->pace(hd / 2, (nq / 3 + nq % 3) * C);  // 4 keys' K and V (hd / 2 lines) over the tiles' steps
  for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
    const int64_t b = std::min(BLOCK, n - j0), bw = (b + W - 1) / W;
    const float* kb = k + j0 * hd;
    for (int64_t j = 0; j < b; j += 4) {
      const float* kr[4];
      for (int u = 0; u < 4; ++u) kr[u] = j + u < b ? kb + (j + u) * hd : ZERO_ROW;
      int64_t x = 0;
      for (; x + 3 <= nq; x += 3)
        score_tile<V, C, 3>(q + x * hd, kr[0], kr[1], kr[2], kr[3], s + x * BLOCK + j, ah);
      for (; x < nq; ++x) score_tile<V, C, 1>(q + x * hd, kr[0], kr[1], kr[2], kr[3], s + x * BLOCK + j, ah);
    }
    for (int64_t x = 0; x < nq; ++x) {  // online softmax: rescale to the new running max, exponentiate, sum
      float* sx = s + x * BLOCK;
      State& t = st[x];
      for (int64_t i = b; i < W * bw; ++i) sx[i] = -3.0e38f;  // the last vector's unused lanes: exp -> 0
      V mx = load_as<V>(sx);
      for (int64_t i = 1; i < bw; ++i) mx = vmax(mx, load_as<V>(sx + W * i));
      const float top = raise_max<V, C>(t, hmax(mx));
      V sum = splat_as<V>(0.f);
      for (int64_t i = 0; i < bw; ++i) {
        const V e = exp_nonpos(load_as<V>(sx + W * i) - splat_as<V>(top));
        store(sx + W * i, e);
        sum += e;
      }
      t.l += hsum(sum);
    }
    add_values<V, C>(s, BLOCK, 1, [st](int64_t x) { return st[x].acc; }, nq, v + j0 * hd, b);
  }
}

#if defined(__AVX512F__) && !defined(ILF_DECODE_V8)  // ILF_DECODE_V8: as an 8-lane (AVX2) host would
constexpr int VREGS = 32;  // vector registers the tiles below may fill
#else
constexpr int VREGS = 16;
#endif

// Online-softmax update of QT queries from a block's scores held in registers (acc[x][u]: keys W u .. W u + W - 1;
// keys from b on masked), their probabilities to s (row x at s + x * BLOCK). Only the first NU vectors hold keys
// (b <= W NU): the rest would be exact zeros after exp, adding nothing to the sum.
template <typename V, int C, int QT, int NV, int NU>
inline void softmax_tile(V (&acc)[QT][NV], State* st, int64_t b, float* s) {
  constexpr int W = lanes<V>;
  for (int x = 0; x < QT; ++x) {
    if (b < BLOCK)
      for (int u = 0; u < NU; ++u)
        for (int i = 0; i < W; ++i)
          if (W * u + i >= b) acc[x][u][i] = -3.0e38f;  // exp -> 0, whatever the block's unused columns hold
    V mx = acc[x][0];
    for (int u = 1; u < NU; ++u) mx = vmax(mx, acc[x][u]);
    State& t = st[x];
    const float top = raise_max<V, C>(t, hmax(mx));
    V sum = splat_as<V>(0.f);
    for (int u = 0; u < NU; ++u) {
      const V e = exp_nonpos(acc[x][u] - splat_as<V>(top));
      store(s + x * BLOCK + W * u, e);
      sum += e;
    }
    t.l += hsum(sum);
  }
}

// Scores of QT queries (rows of q, stride hd) against a block of keys stored transposed (kt: [hd][BLOCK]), the keys in
// the vector lanes: one FMA chain per (query, key) over the head dimension in order, no horizontal sums; then the
// softmax update in registers. A query's arithmetic is the same whatever QT and its place in the tile. Only the
// first NU key vectors are scored (a block's last, partly filled: b <= W NU; the lanes past b are masked anyway).
template <typename V, int C, int QT, int NU>
inline void blocked_tile(const float* q, State* st, const float* kt, int64_t b, float* s, Ahead* ah) {
  constexpr int W = lanes<V>, NV = BLOCK / W;
  constexpr int64_t hd = W * C;
  constexpr int NH = NV < 4 ? NV : 4;  // key vectors per pass over the head dimension (8 lanes: two passes)
  V acc[QT][NV];
  for (int u0 = 0; u0 < NU; u0 += NH) {
    constexpr int L = NU < NH ? NU : NH;  // a pass's vectors (the last pass may score fewer: `u0 + u < NU`)
    V part[QT][L];
    for (int x = 0; x < QT; ++x)
      for (int u = 0; u < L; ++u) part[x][u] = splat_as<V>(0.f);
    for (int64_t d = 0; d < hd; ++d) {
      if (ah) ah->tick();
      V kd[L];
      for (int u = 0; u < L; ++u) kd[u] = u0 + u < NU ? load_as<V>(kt + d * BLOCK + W * (u0 + u)) : splat_as<V>(0.f);
      for (int x = 0; x < QT; ++x) {
        const V qx = splat_as<V>(q[x * hd + d]);
        for (int u = 0; u < L; ++u)
          if (u0 + u < NU) part[x][u] += qx * kd[u];
      }
    }
    for (int x = 0; x < QT; ++x)
      for (int u = 0; u < L; ++u)
        if (u0 + u < NU) acc[x][u0 + u] = part[x][u];
  }
  softmax_tile<V, C, QT, NV, NU>(acc, st, b, s);
}

// blocked_tile scoring the block's first nu key vectors (1 <= nu <= NU), one instance per count.
template <typename V, int C, int QT, int NU = BLOCK / lanes<V>>
inline void blocked_tile_upto(int64_t nu, const float* q, State* st, const float* kt, int64_t b, float* s, Ahead* ah) {
  if constexpr (NU > 1)
    if (nu < NU) return blocked_tile_upto<V, C, QT, NU - 1>(nu, q, st, kt, b, s, ah);
  blocked_tile<V, C, QT, NU>(q, st, kt, b, s, ah);
}

// `attend` over keys held in blocks of BLOCK positions, each transposed ([hd][BLOCK]: keys_blocked in attention.py;
// the last block's unused columns any finite or not), values as rows: a block's scores for a tile of queries stay
// in registers through the softmax, and the values go in taller tiles. The decode kernel's prompt part, where a
// prompt's rows x a group's heads share each block (session 19: 2 x the rows form's speed at 24 queries).
template <typename V, int C>
void attend_blocked(const float* q, State* st, int64_t nq, const float* kt, const float* v, int64_t n, float* s,
                    Ahead* ah) {
  constexpr int W = lanes<V>;
  constexpr int64_t hd = W * C;
  // tile heights, measured (session 19, 24 queries x 354 keys): scores 8 x 4 vectors on 16 lanes (4 or 6 were
  // slower), 3 x 4 on 8; values 6 x 4 vectors where there are 32 registers
  constexpr int QT = W == 16 ? 8 : 3, QV = VREGS == 32 ? 6 : 3;
  static_assert(BLOCK % W == 0, "a block's keys must fill whole vectors");
  // a block's K and V (2 BLOCK hd / 16 lines) over its score loops' steps: tiles x passes x hd
  constexpr int64_t passes = BLOCK / W < 4 ? 1 : BLOCK / W / 4;
  if (ah) ah->pace(2 * BLOCK * hd / 16, (nq / QT + nq % QT / 3 + nq % QT % 3) * passes * hd);
  for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
    const int64_t b = std::min(BLOCK, n - j0), nu = (b + W - 1) / W;
    const float* kb = kt + j0 * hd;
    int64_t x = 0;
    for (; x + QT <= nq; x += QT) blocked_tile_upto<V, C, QT>(nu, q + x * hd, st + x, kb, b, s + x * BLOCK, ah);
    for (; x + 3 <= nq; x += 3) blocked_tile_upto<V, C, 3>(nu, q + x * hd, st + x, kb, b, s + x * BLOCK, ah);
    for (; x < nq; ++x) blocked_tile_upto<V, C, 1>(nu, q + x * hd, st + x, kb, b, s + x * BLOCK, ah);
    add_values<V, C, QV>(s, BLOCK, 1, [st](int64_t y) { return st[y].acc; }, nq, v + j0 * hd, b);
  }
}

// Scores of JT keys (rows of k, each hd floats) against QT vectors of 8 queries (qt: [hd][nqp], transposed): one FMA
// chain per (key, query lane) over the head dimension in order, so a query's score is the same in any lane and tile.
template <int C8, int JT, int QT>
inline void wide_score_tile(const float* qt, int64_t nqp, const float* const* kr, float* s) {
  constexpr int64_t hd = 8 * C8;
  v8 acc[JT][QT];
  for (int u = 0; u < JT; ++u)
    for (int w = 0; w < QT; ++w) acc[u][w] = splat(0.f);
  for (int64_t d = 0; d < hd; ++d) {
    v8 qv[QT];
    for (int w = 0; w < QT; ++w) qv[w] = load(qt + d * nqp + 8 * w);
    for (int u = 0; u < JT; ++u) {
      const v8 kd = splat(kr[u][d]);
      for (int w = 0; w < QT; ++w) acc[u][w] += kd * qv[w];
    }
  }
  for (int u = 0; u < JT; ++u)
    for (int w = 0; w < QT; ++w) store(s + u * nqp + 8 * w, acc[u][w]);
}

// The prompt part: queries qt ([hd][nqp] floats, transposed, pre-scaled, nq <= nqp, nqp a multiple of 8) against
// keys and values [0, n), a block of keys at a time, with the queries in the vector lanes: scores in tiles of 4 keys
// x 3 query vectors (no horizontal sums), the online softmax over 8 queries at once (running max m and sum l, one
// lane per query), then the values as in `attend`. Each query's arithmetic is the same in any lane, whatever nq.
template <int C8>
void attend_wide(const float* qt, int64_t nq, int64_t nqp, float* m, float* l, float* const* acc, const float* k,
                 const float* v, int64_t n, float* s) {
  constexpr int64_t hd = 8 * C8;
  const int64_t nv = nqp / 8;
  for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
    const int64_t b = std::min(BLOCK, n - j0);
    const float* kb = k + j0 * hd;
    for (int64_t j = 0; j < b; j += 4) {
      const float* kr[4];
      for (int u = 0; u < 4; ++u) kr[u] = j + u < b ? kb + (j + u) * hd : ZERO_ROW;
      int64_t w = 0;
      for (; w + 3 <= nv; w += 3) wide_score_tile<C8, 4, 3>(qt + 8 * w, nqp, kr, s + j * nqp + 8 * w);
      if (nv - w == 2) wide_score_tile<C8, 4, 2>(qt + 8 * w, nqp, kr, s + j * nqp + 8 * w);
      else if (nv - w == 1) wide_score_tile<C8, 4, 1>(qt + 8 * w, nqp, kr, s + j * nqp + 8 * w);
    }
    for (int64_t w = 0; w < nv; ++w) {  // online softmax, 8 queries per vector
      float* sw = s + 8 * w;
      v8 mx = load(sw);
      for (int64_t i = 1; i < b; ++i) mx = vmax(mx, load(sw + i * nqp));
      const v8 old = load(m + 8 * w), top = vmax(old, mx), cf = exp_nonpos(old - top);
      store(m + 8 * w, top);
      v8 sum = load(l + 8 * w) * cf;
      for (int64_t i = 0; i < b; ++i) {
        const v8 e = exp_nonpos(load(sw + i * nqp) - top);
        store(sw + i * nqp, e);
        sum += e;
      }
      store(l + 8 * w, sum);
      for (int x = 0; x < 8 && 8 * w + x < nq; ++x)
        if (top[x] > old[x])
          for (int c = 0; c < C8; ++c) store(acc[8 * w + x] + 8 * c, load(acc[8 * w + x] + 8 * c) * splat(cf[x]));
    }
    add_values<v8, C8>(s, 1, nqp, [acc](int64_t x) { return acc[x]; }, nq, v + j0 * hd, b);
  }
}

using AttendFn = void (*)(const float*, State*, int64_t, const float*, const float*, int64_t, float*, Ahead*);
using WideFn = void (*)(const float*, int64_t, int64_t, float*, float*, float* const*, const float*, const float*,
                        int64_t, float*);

// Both forms compiled for a head size of the Llama family (SmolLM2: 64) or of the tests' tiny models; nullptrs
// for others. `decode` (the decode kernel's `attend`) runs 16 lanes where the host has AVX-512 and the head size
// fills them: its sums are then grouped differently from the 8-lane form's (the host's own numerics, fixed for
// every row and batch). Prefill keeps 8 lanes: the wide form's lanes are a block's 8 positions x a group's heads,
// and its short diagonal blocks (1-8 keys a query) ran slower at 16 (session 18: prefill 8.6 -> 10.5 s on refine).
struct Attenders {
  AttendFn attend;
  WideFn wide;
  AttendFn decode;
  AttendFn prompt;  // the decode kernel's prompt part: attend_blocked, keys in blocks ([hd][BLOCK] each)
};

#if defined(__AVX512F__) && !defined(ILF_DECODE_V8)  // ILF_DECODE_V8: 8 lanes anyway (benchmarks/decode_attention.py)
using VA = v16;  // the decode kernel's vector
#else
using VA = v8;
#endif

inline Attenders attenders_for(int64_t hd) {
  constexpr int WA = lanes<VA>;
  switch (hd) {
    case 8: return {attend<v8, 1>, attend_wide<1>, attend<v8, 1>, attend_blocked<v8, 1>};
    case 16: return {attend<v8, 2>, attend_wide<2>, attend<VA, 16 / WA>, attend_blocked<VA, 16 / WA>};
    case 32: return {attend<v8, 4>, attend_wide<4>, attend<VA, 32 / WA>, attend_blocked<VA, 32 / WA>};
    case 64: return {attend<v8, 8>, attend_wide<8>, attend<VA, 64 / WA>, attend_blocked<VA, 64 / WA>};
    case 128: return {attend<v8, 16>, attend_wide<16>, attend<VA, 128 / WA>, attend_blocked<VA, 128 / WA>};
    default: return {nullptr, nullptr, nullptr, nullptr};
  }
}

// One thread's working memory for up to `cap` queries of one work item (malloc: no libstdc++): the queries
// pre-scaled as rows [cap][hd] (attend) and transposed [hd][cap8] (attend_wide), their accumulators [cap][hd], a
// block's scores [BLOCK][cap8], the running max and sum [cap8] each, softmax states and accumulator pointers [cap].
struct Work {
  float *q = nullptr, *acc = nullptr, *qt = nullptr, *s = nullptr, *m = nullptr, *l = nullptr;
  State* st = nullptr;
  float** accp = nullptr;
  Ahead ahead;  // an item's prefetches, up to `regions` of them
  int64_t hd = 0, nq = 0, nqp = 0;
  bool ok = false;  // init succeeded

  bool init(int64_t cap, int64_t head_dim, int64_t regions) {
    hd = head_dim;
    const int64_t cap8 = (cap + 7) / 8 * 8;
    q = static_cast<float*>(std::malloc(sizeof(float) * (2 * cap * hd + cap8 * hd + BLOCK * cap8 + 2 * cap8 + 8)));
    st = static_cast<State*>(std::malloc(sizeof(State) * (cap + 1)));
    accp = static_cast<float**>(std::malloc(sizeof(float*) * (cap + 1)));
    ahead.r = static_cast<Ahead::Region*>(std::malloc(sizeof(Ahead::Region) * (regions + 1)));
    if (!q || !st || !accp || !ahead.r) return false;
    acc = q + cap * hd, qt = acc + cap * hd, s = qt + cap8 * hd, m = s + BLOCK * cap8, l = m + cap8;
    return ok = true;
  }
  void release() { std::free(q), std::free(st), std::free(accp), std::free(ahead.r); }

  // Queries y < n: src(y) (hd floats) x scale, as rows and, for `shared_keys`, also transposed (the padding lanes
  // zero); accumulators zero; each query's softmax state fresh.
  template <typename Src>
  void load_queries(int64_t n, Src src, float scale, bool transposed) {
    nq = n, nqp = (n + 7) / 8 * 8;
    std::memset(acc, 0, sizeof(float) * nq * hd);
    if (transposed) std::memset(qt, 0, sizeof(float) * nqp * hd);
    for (int64_t y = 0; y < nq; ++y) {
      const float* x = src(y);
      for (int64_t d = 0; d < hd; ++d) q[y * hd + d] = x[d] * scale;
      if (transposed)
        for (int64_t d = 0; d < hd; ++d) qt[d * nqp + y] = q[y * hd + d];
      accp[y] = acc + y * hd;
      st[y] = {-3.0e38f, 0.f, accp[y]};
    }
  }
  // Every query against the keys they all see, with the queries in the lanes (attend_wide), from fresh states.
  void shared_keys(WideFn wide, const float* k, const float* v, int64_t n) {
    for (int64_t y = 0; y < nqp; ++y) m[y] = -3.0e38f, l[y] = 0.f;
    wide(qt, nq, nqp, m, l, accp, k, v, n, s);
    for (int64_t y = 0; y < nq; ++y) st[y] = {m[y], l[y], accp[y]};
  }
  // Query y's output: its accumulator over its sum of exponentials.
  void finish(int64_t y, float* dst) const {
    const float inv = 1.f / st[y].l;
    for (int64_t d = 0; d < hd; ++d) dst[d] = st[y].acc[d] * inv;
  }
};

// body(work, item) for every item in [0, items) on `threads` OpenMP threads, each with its own Work for `cap`
// queries and `regions` prefetch regions; dynamic schedule (items differ in size; each item is one thread's, so
// results do not depend on it). Returns 0, or 2 when a thread's Work could not be allocated.
template <typename Body>
int for_items(int64_t items, int64_t cap, int64_t hd, int64_t threads, int64_t regions, Body body) {
  int failed = 0;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    Work w;
    if (!w.init(cap, hd, regions)) {
#pragma omp atomic write
      failed = 2;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < items; ++t)
      if (w.ok) body(w, t);
    w.release();
  }
  return failed;
}

}  // namespace ilf
