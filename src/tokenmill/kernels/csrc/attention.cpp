// Paged attention for the CPU: every query row (decode or prefill) read straight from the
// paged KV cache, no gather. Part of the library kernels/cpu.py builds from csrc/.
#include <omp.h>

#include "attn_float.h"
#include "attn_kv8.h"
#include "attn_paged.h"
#include "attn_rows.h"
#include "kv8.h"
#include "tm_kernels.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// The per-item helpers here and in attn_kv8.h are always inlined: called from the row-block
// path too, GCC kept them out of line, and a decode step's attention was ~5% slower.
namespace kv8 = tmk::kv8;
using tmk::attn::Item;
using tmk::attn::Prefetch;
using tmk::attn::Q8;
using tmk::attn::row_block;
#if defined(TM_ATTN_ROW_BLOCKS)
using tmk::attn::KC;
using tmk::attn::pv_rows;
#endif
using tmk::attn::scores_int8;
using tmk::attn::weighted_sum_int8;
using tmk::exp_neg;
using tmk::load;
using tmk::round_to;
using tmk::store;
#if defined(__AVX512BF16__)
using tmk::attn::qk_block_bf16;
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
using tmk::attn::qk_block_f32;
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
using tmk::attn::pv_heads;
#endif

// q . k over n dims (k of the cache's type). Not inlined, on purpose: inlined into
// paged_decode's loops, GCC compiled this sum in several versions (loop versioning around the
// prefetch's progress), and which version ran depended on the next work item, so a float32
// row's scores changed in the last bit with the rest of the batch. One compiled body gives
// one summation order.
template <typename T>
[[gnu::noinline]] float dot_row(const float* q, const T* k, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += q[d] * load(k, d);
  return s;
}

// sc[g][0:n] = scale * (q_g . K[p]) for the item's keys p, n = end - start, G query heads
// (row q, heads D apart); rows of sc `stride` apart. Prefetches the next item as it goes.
template <typename T, int64_t DC>
[[gnu::always_inline]]
inline void scores(const T* q, const Item<T>& it, int64_t bs, int64_t D, int64_t G,
                   float scale, float* sc, int64_t stride, float* qf, Prefetch<T>& pf) {
  const int64_t start = it.start, end = it.end;
#if defined(__AVX512BF16__)
  // bfloat16 with a head dim of 64 or 128 and 16-key blocks: 16 scores at a time (the
  // per-key horizontal sums were ~60% of the kernel); the scale is applied after.
  if constexpr (sizeof(T) == 2 && DC % 32 == 0 && DC > 0) {
    if (bs == 16) {
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* qrow = reinterpret_cast<const uint16_t*>(q + g * D);
        for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
          if (g == 0) pf.step(false);
          const uint16_t* kb = reinterpret_cast<const uint16_t*>(it.kh + it.table[p0 / bs] * bs * D);
          qk_block_bf16<DC>(qrow, kb, std::max(p0, start) - p0, std::min(p0 + bs, end) - p0,
                            sc + g * stride + (p0 - start));
        }
        float* sg = sc + g * stride;
#pragma omp simd
        for (int64_t i = 0; i < end - start; ++i) sg[i] *= scale;
      }
      return;
    }
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load(q + g * D, d) * scale;
  }
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  // float32 keys (or bfloat16 ones widened, without AVX512-BF16's tiles above) with a head
  // dim that fills whole vectors and 16-key blocks: 16 at a time
  if constexpr (DC > 0 && DC % 16 == 0) {
    if (bs == 16) {
      for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
        pf.step(false);
        const T* kb = it.kh + it.table[p0 / bs] * bs * D;
        for (int64_t g = 0; g < G; ++g)
          qk_block_f32<DC>(qf + g * D, kb, std::max(p0, start) - p0,
                           std::min(p0 + bs, end) - p0, sc + g * stride + (p0 - start));
      }
      return;
    }
  }
#endif
  // keys block by block: one table lookup (and division) per block, not per key
  for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
    pf.step(false);
    const T* kb = it.kh + it.table[p0 / bs] * bs * D;
    for (int64_t p = std::max(p0, start); p < std::min(p0 + bs, end); ++p) {
      const T* krow = kb + (p - p0) * D;
      for (int64_t g = 0; g < G; ++g) {
        sc[g * stride + (p - start)] = dot_row(qf + g * D, krow, D);
      }
    }
  }
}

// Softmax in place over each of G rows of n scores (rows `stride` apart). Not inlined: in
// some of paged_attend's instantiations GCC then left the exp loop scalar on AVX2 (a third
// of decode attention's time); compiled once it is vectorized. A call per item costs nothing.
[[gnu::noinline]]
void softmax_rows(float* sc, int64_t n, int64_t G, int64_t stride) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = sc + g * stride;
    float m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = sg[i] > m ? sg[i] : m;  // (std::max stayed scalar)
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sg[i] = exp_neg(sg[i] - m);
      sum += sg[i];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) sg[i] *= inv;
  }
}

// Rows with more than SPLIT keys take their keys in SPLIT-key chunks, a work item per (row, KV
// head, chunk): a few long rows (a batch-1 decode at a long context) would otherwise leave
// threads idle, an item per KV head. Each chunk's softmax is its own (its max m, l = the sum
// of exp(s - m), the weighted sum of those exps: softmax_partial); the chunks of a (row, head)
// then merge in chunk order, out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c with M
// the largest m_c. A row's chunks follow from its own keys, so its bits are the same alone as
// in any batch; rows with fewer keys take the one-item path, as before.
constexpr int64_t SPLIT = 512;

// The first half of softmax_rows: e = exp(s - m) in place over each of G rows of n scores,
// with m and l = sum(e) of row g written to ml[2g] and ml[2g + 1]. Out of line, as it.
[[gnu::noinline]]
void softmax_partial(float* sc, int64_t n, int64_t G, int64_t stride, float* ml) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = sc + g * stride;
    float m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = sg[i] > m ? sg[i] : m;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sg[i] = exp_neg(sg[i] - m);
      sum += sg[i];
    }
    ml[2 * g] = m;
    ml[2 * g + 1] = sum;
  }
}

// acc[g][0:D] = sum over the item's keys p of w[g][p - start] * V[p], for G heads.
template <typename T, int64_t DC>
[[gnu::always_inline]]
inline void weighted_sum(const Item<T>& it, int64_t bs, int64_t D, int64_t G, const float* w,
                         int64_t stride, float* acc, Prefetch<T>& pf) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // bfloat16 on any AVX-512 CPU (widened by a shift; only the scores' 16-key tiles need
  // AVX512-BF16): the generic loop's FMAs in the same order, the sums in registers
  if constexpr (sizeof(T) == 2 && DC % 16 == 0 && DC > 0) {
    pv_heads<DC>(reinterpret_cast<const uint16_t*>(it.vh), it.table, bs, it.start, it.end, w,
                 stride, G, acc, pf);
    return;
  }
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if constexpr (std::is_same_v<T, float> && DC % 32 == 0 && DC > 0) {
    pv_heads<DC>(it.vh, it.table, bs, it.start, it.end, w, stride, G, acc, pf);
    return;
  }
#endif
  for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.f;
  for (int64_t p0 = it.start - it.start % bs; p0 < it.end; p0 += bs) {
    pf.step(true);
    const T* vb = it.vh + it.table[p0 / bs] * bs * D;
    for (int64_t p = std::max(p0, it.start); p < std::min(p0 + bs, it.end); ++p) {
      const T* vrow = vb + (p - p0) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float wg = w[g * stride + (p - it.start)];
        float* __restrict ag = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += wg * load(vrow, d);
      }
    }
  }
}

// One work item of a row block (rows > 1, see row_block): each row's scores and softmax as
// alone, then the block's weighted sums together (pv_rows). q: the first row's query heads of
// this KV head (rows q_tok apart); rb_bounds: the rows' [start, end). Out of line: inlined,
// it made the single-row loop around it slower (decode attention 5-20% on a noisy host).
template <typename T, typename E, int64_t DC>
[[gnu::noinline]] void row_block_item(const T* q, int64_t q_tok, const Item<E>& it, int64_t bs,
                                      int64_t D, int64_t G, const int64_t* rb_bounds,
                                      int64_t rows, float scale, int64_t max_keys, float* qf,
                                      Q8& q8, float* acc, Prefetch<E>& pf) {
#if defined(TM_ATTN_ROW_BLOCKS)
  if constexpr (row_block<E, DC>(1, KC) > 1) {
    thread_local std::vector<float> sc;  // the rows' scores [rows][G][max_keys]
    if (sc.size() < size_t(rows * G * max_keys)) sc.resize(size_t(rows * G * max_keys));
    int64_t ends[8];
    for (int64_t i = 0; i < rows; ++i) {
      Item<E> row = it;
      row.end = ends[i] = rb_bounds[2 * i + 1];
      float* si = sc.data() + i * G * max_keys;
      if constexpr (std::is_same_v<E, int8_t>)
        scores_int8<T, DC>(q + i * q_tok, row, bs, D, G, scale, si, max_keys, q8, pf);
      else
        scores<T, DC>(q + i * q_tok, row, bs, D, G, scale, si, max_keys, qf, pf);
      softmax_rows(si, row.end - row.start, G, max_keys);
    }
    pv_rows<E, DC>(it, bs, rows * G, G, ends, sc.data(), max_keys, acc, pf);
    return;
  }
#endif
  (void)q, (void)q_tok, (void)it, (void)bs, (void)D, (void)G, (void)rb_bounds, (void)rows;
  (void)scale, (void)max_keys, (void)qf, (void)q8, (void)acc, (void)pf;
}

// Attention straight from the paged cache, one query row at a time, no gather: decode rows
// and prefill rows alike (a prefill row is a query that attends to the keys up to its own
// position, written to the cache before this call). q [B, Hq, D] (row stride q_tok, head
// stride D), out [B, Hq, D] contiguous; k/v caches [Hk, n_blocks, bs, D] (head stride
// kv_head); tables [S, table_stride] block ids per sequence, row_seq [B] each row's sequence
// (null: row b is sequence b); bounds [B, 2] = the key positions [start, end) each row attends
// to. One work item per (row, KV head), or per (row block, KV head) for a prefill's rows (see
// row_block_item): its G = Hq / Hk query heads share every K and V row they read. Scores live
// in float32 scratch [threads, G * max_keys] (a row block's in a thread's own buffer); the
// softmax and both products run in float32.
// E: the cache's element, T or int8_t (kv8.h's layout, kv_head in bytes).
// first: with BLOCKS, the first row of each of n_work row blocks (first[n_work] = B); without,
// null and every row alone (n_work = B): the loop then compiles as it did before row blocks
// (decode steps: their attention was ~5% slower through the blocks' bookkeeping).
template <typename T, typename E, int64_t DC, bool BLOCKS>
void paged_attend(const T* q, int64_t q_tok, T* out, const E* kc, const E* vc, int64_t kv_head,
                  int64_t bs, int64_t head_dim, const int64_t* tables, int64_t table_stride,
                  const int64_t* row_seq, const int64_t* bounds, const int64_t* first,
                  int64_t n_work, int64_t Hq, int64_t Hk, float scale, float* scratch,
                  int64_t max_keys, int threads) {
  constexpr bool INT8 = std::is_same_v<E, int8_t>;
  const int64_t G = Hq / Hk, D = DC ? DC : head_dim, n_items = n_work * Hk;
  const int64_t block_elems = INT8 ? kv8::block_bytes(bs, D) : bs * D;
  // Items taken from both ends in turn: each thread's share is two contiguous runs, one from
  // the front and one from the back, so a prefill's short and long rows even out.
  auto item_of = [&](int64_t p) { return (p & 1) ? n_items - 1 - p / 2 : p / 2; };
  auto view = [&](int64_t item) {  // the item's keys: up to its last row's end
    const int64_t k = item / Hk, h = item % Hk;
    const int64_t b = BLOCKS ? first[k] : k, e = BLOCKS ? first[k + 1] - 1 : k;
    return Item<E>{tables + (row_seq ? row_seq[b] : b) * table_stride, kc + h * kv_head,
                   vc + h * kv_head, bounds[2 * b], bounds[2 * e + 1]};
  };
#pragma omp parallel num_threads(threads)
  {
    float* sc = scratch + int64_t(omp_get_thread_num()) * G * max_keys;
    // Aligned alike on every thread's stack: the vector sums over qf split the same way
    // whichever thread runs an item.
    alignas(64) float qf[16 * 256];
    alignas(64) float acc[16 * 256];  // G * D <= 4096, checked by the caller
    Prefetch<E> pf;
    Q8 q8;  // the int8 cache's quantized query (unused otherwise)
#pragma omp for schedule(static)
    for (int64_t p = 0; p < n_items; ++p) {
      // Under the static schedule a thread's p run consecutively, so p + 1 is its next item
      // (or, past its share, another thread's first: harmless). A prefill's rows of one
      // sequence share blocks, in cache after the first: as p + 1 comes from the same end as
      // p - 1, when both read the same sequence and head there is nothing to fetch.
      const int64_t item = item_of(p), k = item / Hk, h = item % Hk;
      const int64_t b0 = BLOCKS ? first[k] : k, rows = BLOCKS ? first[k + 1] - b0 : 1;
      const Item<E> it = view(item);
      if (rows == 1 && it.end - it.start > SPLIT) continue;  // split_attend's
      if (p + 1 < n_items) {
        const Item<E> nx = view(item_of(p + 1));
        const Item<E> prev = p > 0 ? view(item_of(p - 1)) : Item<E>{};
        const bool seen = p > 0 && prev.table == nx.table && prev.kh == nx.kh;
        if (!seen && nx.end - nx.start <= SPLIT) pf.reset(nx, bs, block_elems);  // not a long row
      }
      if (rows == 1) {
        const T* qrow = q + b0 * q_tok + h * G * D;
        if constexpr (INT8) {
          scores_int8<T, DC>(qrow, it, bs, D, G, scale, sc, max_keys, q8, pf);
          softmax_rows(sc, it.end - it.start, G, max_keys);
          weighted_sum_int8<DC>(it, bs, D, G, sc, max_keys, acc, pf);
        } else {
          scores<T, DC>(qrow, it, bs, D, G, scale, sc, max_keys, qf, pf);
          softmax_rows(sc, it.end - it.start, G, max_keys);
          weighted_sum<T, DC>(it, bs, D, G, sc, max_keys, acc, pf);
        }
      } else if constexpr (BLOCKS) {
        row_block_item<T, E, DC>(q + b0 * q_tok + h * G * D, q_tok, it, bs, D, G,
                                 bounds + 2 * b0, rows, scale, max_keys, qf, q8, acc, pf);
      }
      pf.finish();
      for (int64_t i = 0; i < rows; ++i) {
        T* orow = out + ((b0 + i) * Hq + h * G) * D;
        const float* ai = acc + i * G * D;
#pragma omp simd
        for (int64_t j = 0; j < G * D; ++j) store(orow, j, ai[j]);
      }
    }
  }
}

// The rows of `longs` (each with more than SPLIT keys) in chunks (see SPLIT): partial results
// per (chunk, KV head) in a buffer, then each (row, head) merged. Arguments as paged_attend's;
// scratch holds threads x G x max_keys floats, max_keys > SPLIT here.
template <typename T, typename E, int64_t DC>
void split_attend(const T* q, int64_t q_tok, T* out, const E* kc, const E* vc, int64_t kv_head,
                  int64_t bs, int64_t head_dim, const int64_t* tables, int64_t table_stride,
                  const int64_t* row_seq, const int64_t* bounds, const std::vector<int64_t>& longs,
                  int64_t Hq, int64_t Hk, float scale, float* scratch, int64_t max_keys,
                  int threads) {
  constexpr bool INT8 = std::is_same_v<E, int8_t>;
  const int64_t G = Hq / Hk, D = DC ? DC : head_dim, n_rows = int64_t(longs.size());
  const int64_t block_elems = INT8 ? kv8::block_bytes(bs, D) : bs * D;
  std::vector<int64_t> first(size_t(n_rows) + 1, 0);  // each row's first chunk
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t b = longs[i], n = bounds[2 * b + 1] - bounds[2 * b];
    first[i + 1] = first[i] + (n + SPLIT - 1) / SPLIT;
  }
  const int64_t n_items = first[n_rows] * Hk, part_len = G * (D + 2);
  std::vector<float> part(size_t(n_items * part_len));  // per item: G x D sums, G x (m, l)
  auto row_of = [&](int64_t chunk) {  // the index into longs of the row owning a chunk
    return int64_t(std::upper_bound(first.begin(), first.end(), chunk) - first.begin()) - 1;
  };
  auto view = [&](int64_t p) {  // item p: chunk p / Hk under KV head p % Hk
    const int64_t chunk = p / Hk, h = p % Hk, i = row_of(chunk), b = longs[i];
    const int64_t start = bounds[2 * b] + (chunk - first[i]) * SPLIT;
    return Item<E>{tables + (row_seq ? row_seq[b] : b) * table_stride, kc + h * kv_head,
                   vc + h * kv_head, start, std::min(bounds[2 * b + 1], start + SPLIT)};
  };
#pragma omp parallel num_threads(threads)
  {
    float* sc = scratch + int64_t(omp_get_thread_num()) * G * max_keys;
    alignas(64) float qf[16 * 256];
    alignas(64) float acc[16 * 256];
    Prefetch<E> pf;
    Q8 q8;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < n_items; ++p) {
      const int64_t h = p % Hk, b = longs[row_of(p / Hk)];
      const Item<E> it = view(p);
      if (p + 1 < n_items) pf.reset(view(p + 1), bs, block_elems);
      const T* qrow = q + b * q_tok + h * G * D;
      float* pp = part.data() + p * part_len;
      if constexpr (INT8) {
        scores_int8<T, DC>(qrow, it, bs, D, G, scale, sc, max_keys, q8, pf);
        softmax_partial(sc, it.end - it.start, G, max_keys, pp + G * D);
        weighted_sum_int8<DC>(it, bs, D, G, sc, max_keys, acc, pf);
      } else {
        scores<T, DC>(qrow, it, bs, D, G, scale, sc, max_keys, qf, pf);
        softmax_partial(sc, it.end - it.start, G, max_keys, pp + G * D);
        weighted_sum<T, DC>(it, bs, D, G, sc, max_keys, acc, pf);
      }
      pf.finish();
      std::memcpy(pp, acc, size_t(G * D) * sizeof(float));
    }
    // (the loop's barrier: every chunk is done)
#pragma omp for schedule(static)
    for (int64_t u = 0; u < n_rows * Hk; ++u) {
      const int64_t i = u / Hk, h = u % Hk, c0 = first[i], c1 = first[i + 1];
      T* orow = out + (longs[i] * Hq + h * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        float m = -INFINITY, l = 0.f;
        for (int64_t c = c0; c < c1; ++c) m = std::max(m, part[(c * Hk + h) * part_len + G * D + 2 * g]);
        for (int64_t c = c0; c < c1; ++c) {
          const float* ml = part.data() + (c * Hk + h) * part_len + G * D + 2 * g;
          l += exp_neg(ml[0] - m) * ml[1];
        }
        const float inv = 1.f / l;
        float* a = acc;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) a[j] = 0.f;
        for (int64_t c = c0; c < c1; ++c) {
          const float* pc = part.data() + (c * Hk + h) * part_len;
          const float wc = exp_neg(pc[G * D + 2 * g] - m) * inv;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) a[j] = std::fma(wc, pc[g * D + j], a[j]);
        }
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) store(orow + g * D, j, a[j]);
      }
    }
  }
}

// Work blocks of rows: a prefill's consecutive rows of one sequence (same start, ends one apart)
// up to row_block of them together, every other row alone; with none to join, the loop
// without blocks.
template <typename T, typename E, int64_t DC>
void paged_decode(const T* q, int64_t q_tok, T* out, const E* kc, const E* vc, int64_t kv_head,
                  int64_t bs, int64_t head_dim, const int64_t* tables, int64_t table_stride,
                  const int64_t* row_seq, const int64_t* bounds, int64_t B, int64_t Hq,
                  int64_t Hk, float scale, float* scratch, int64_t max_keys, int threads) {
  const int64_t rb = row_block<E, DC>(Hq / Hk, bs);
  auto is_long = [&](int64_t b) { return bounds[2 * b + 1] - bounds[2 * b] > SPLIT; };
  std::vector<int64_t> longs;  // rows in chunks (split_attend); none: no allocation
  for (int64_t b = 0; b < B; ++b)
    if (is_long(b)) longs.push_back(b);
  if (!longs.empty())
    split_attend<T, E, DC>(q, q_tok, out, kc, vc, kv_head, bs, head_dim, tables, table_stride,
                           row_seq, bounds, longs, Hq, Hk, scale, scratch, max_keys, threads);
  if (int64_t(longs.size()) == B) return;
  auto follows = [&](int64_t b) {  // row b continues row b - 1's prefill (neither in chunks)
    return row_seq[b] == row_seq[b - 1] && bounds[2 * b] == bounds[2 * b - 2] &&
           bounds[2 * b + 1] == bounds[2 * b - 1] + 1 && !is_long(b);
  };
  bool any = false;  // a decode step has none: no allocation on its path
  for (int64_t b = 1; rb > 1 && row_seq && b < B && !any; ++b) any = follows(b);
  std::vector<int64_t> first;
  if (any) {
    first.reserve(size_t(B) + 1);
    for (int64_t b = 0; b < B; ++b)
      if (b == 0 || b - first.back() >= rb || !follows(b)) first.push_back(b);
  }
  if (any) {
    const int64_t n_work = int64_t(first.size());
    first.push_back(B);
    paged_attend<T, E, DC, true>(q, q_tok, out, kc, vc, kv_head, bs, head_dim, tables,
                                 table_stride, row_seq, bounds, first.data(), n_work, Hq, Hk,
                                 scale, scratch, max_keys, threads);
  } else {
    paged_attend<T, E, DC, false>(q, q_tok, out, kc, vc, kv_head, bs, head_dim, tables,
                                  table_stride, row_seq, bounds, nullptr, B, Hq, Hk, scale,
                                  scratch, max_keys, threads);
  }
}

}  // namespace

extern "C" {

// The int8 cache's: kv_head in bytes, D a multiple of 32, bs of 16.
#define TM_PAGED_DECODE(NAME, T, E)                                                           \
  void NAME(const T* q, int64_t q_tok, T* out, const E* kc, const E* vc, int64_t kv_head,     \
            int64_t bs, int64_t D, const int64_t* tables, int64_t table_stride,               \
            const int64_t* row_seq, const int64_t* bounds, int64_t B, int64_t Hq, int64_t Hk,  \
            float scale, float* scratch, int64_t max_keys, int threads) {                     \
    auto f = D == 64    ? paged_decode<T, E, 64>                                              \
             : D == 128 ? paged_decode<T, E, 128>                                             \
                        : paged_decode<T, E, 0>;                                              \
    f(q, q_tok, out, kc, vc, kv_head, bs, D, tables, table_stride, row_seq, bounds, B, Hq, Hk, \
      scale, scratch, max_keys, threads);                                                     \
  }
TM_PAGED_DECODE(tm_paged_decode_bf16, uint16_t, uint16_t)
TM_PAGED_DECODE(tm_paged_decode_f32, float, float)
TM_PAGED_DECODE(tm_paged_decode_kv8_bf16, uint16_t, int8_t)
TM_PAGED_DECODE(tm_paged_decode_kv8_f32, float, int8_t)

}  // extern "C"
