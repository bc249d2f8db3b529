// Paged attention for the CPU: every query row (decode or prefill) read straight from the
// paged KV cache, no gather. Part of the library kernels/cpu.py builds from csrc/.
#include <omp.h>

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
inline __m512 sum16(const __m512 (&v)[16]) { return tmk::reduce16(v, tmk::vadd); }

// Scores of one bfloat16 query row against rows j_lo..j_hi-1 (< 16) of a block of keys
// (row stride DC): vdpbf16ps on the stored bfloat16 values, float32 sums, written to
// out[j_lo..j_hi-1]. DC is a multiple of 32.
template <int64_t DC>
[[gnu::always_inline]]
inline void qk_block_bf16(const uint16_t* q, const uint16_t* kb, int64_t j_lo, int64_t j_hi,
                          float* out) {
  constexpr int NC = DC / 32;
  __m512bh qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
  __m512 v[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    __m512 acc = _mm512_setzero_ps();
    if (j >= j_lo && j < j_hi)
      for (int c = 0; c < NC; ++c)
        acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(kb + j * DC + 32 * c));
    v[j] = acc;
  }
  const __mmask16 keep = __mmask16(((1u << j_hi) - 1u) & ~((1u << j_lo) - 1u));
  _mm512_mask_storeu_ps(out, keep, sum16(v));
}

#endif  // __AVX512BF16__

#if defined(__AVX512F__)
// acc[g][0:DC] = sum over keys p in [start, end) of w[g][p - start] * V[p] for GC query heads
// (w rows `stride` apart), V rows of the paged cache (block size bs) in bfloat16 or float32
// (E). Each V row is loaded (widened) once and feeds all GC heads from registers; the generic
// loop loaded it per head and kept the sums in memory (~2x the operations). FMA: one
// rounding per term.
template <int64_t DC, int GC, typename E, typename PF>
[[gnu::always_inline]]
inline void pv_vec(const E* vh, const int64_t* table, int64_t bs, int64_t start, int64_t end,
                   const float* w, int64_t stride, float* acc, PF* pf) {
  constexpr int NV = DC / 16;
  __m512 a[GC][NV];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NV; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
    if (pf) pf->step(true);
    const E* vb = vh + table[p0 / bs] * bs * DC;
    for (int64_t p = std::max(p0, start); p < std::min(p0 + bs, end); ++p) {
      const E* vrow = vb + (p - p0) * DC;
      __m512 v[NV];
      for (int c = 0; c < NV; ++c) v[c] = tmk::load16(vrow + 16 * c);
      for (int g = 0; g < GC; ++g) {
        const __m512 wg = _mm512_set1_ps(w[g * stride + (p - start)]);
        for (int c = 0; c < NV; ++c) a[g][c] = _mm512_fmadd_ps(wg, v[c], a[g][c]);
      }
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + g * DC + 16 * c, a[g][c]);
}

// pv_vec over G heads, up to 4 at a time for head dim 64 and 2 for 128 (the sums then fill
// 16 registers next to the V row).
template <int64_t DC, typename E, typename PF>
[[gnu::always_inline]]
inline void pv_heads(const E* vh, const int64_t* table, int64_t bs, int64_t start, int64_t end,
                     const float* w, int64_t stride, int64_t G, float* acc, PF& pf) {
  constexpr int64_t GMAX = DC <= 64 ? 4 : 2;
  for (int64_t g = 0; g < G; g += GMAX) {
    const float* wg = w + g * stride;
    float* ag = acc + g * DC;
    PF* p = g == 0 ? &pf : nullptr;  // the next item's V during the first pass
    switch (std::min(GMAX, G - g)) {
      case 1: pv_vec<DC, 1>(vh, table, bs, start, end, wg, stride, ag, p); break;
      case 2: pv_vec<DC, 2>(vh, table, bs, start, end, wg, stride, ag, p); break;
      case 3: pv_vec<DC, (GMAX >= 3 ? 3 : 1)>(vh, table, bs, start, end, wg, stride, ag, p); break;
      default: pv_vec<DC, GMAX>(vh, table, bs, start, end, wg, stride, ag, p);
    }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// The float32 weighted sum on AVX2 (16 registers): pv_vec's operations for up to 3 heads and
// 32 of their dims at a time (12 sums, a V vector and the 3 weights), each V row read once
// per 32 dims.
template <int64_t DC, int GC, typename PF>
[[gnu::always_inline]]
inline void pv_avx2(const float* vh, const int64_t* table, int64_t bs, int64_t start,
                    int64_t end, const float* w, int64_t stride, float* acc, PF* pf) {
  for (int64_t d0 = 0; d0 < DC; d0 += 32) {
    __m256 a[GC][4];
    for (int g = 0; g < GC; ++g)
      for (int c = 0; c < 4; ++c) a[g][c] = _mm256_setzero_ps();
    for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
      if (pf && d0 == 0) pf->step(true);
      const float* vb = vh + table[p0 / bs] * bs * DC + d0;
      for (int64_t p = std::max(p0, start); p < std::min(p0 + bs, end); ++p) {
        __m256 wg[GC];
        for (int g = 0; g < GC; ++g) wg[g] = _mm256_set1_ps(w[g * stride + (p - start)]);
        for (int c = 0; c < 4; ++c) {
          const __m256 v = _mm256_loadu_ps(vb + (p - p0) * DC + 8 * c);
          for (int g = 0; g < GC; ++g) a[g][c] = _mm256_fmadd_ps(wg[g], v, a[g][c]);
        }
      }
    }
    for (int g = 0; g < GC; ++g)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + g * DC + d0 + 8 * c, a[g][c]);
  }
}

template <int64_t DC, typename PF>
[[gnu::always_inline]]
inline void pv_heads(const float* vh, const int64_t* table, int64_t bs, int64_t start,
                     int64_t end, const float* w, int64_t stride, int64_t G, float* acc,
                     PF& pf) {
  for (int64_t g = 0; g < G; g += 3) {
    const float* wg = w + g * stride;
    float* ag = acc + g * DC;
    PF* p = g == 0 ? &pf : nullptr;
    switch (std::min<int64_t>(3, G - g)) {
      case 1: pv_avx2<DC, 1>(vh, table, bs, start, end, wg, stride, ag, p); break;
      case 2: pv_avx2<DC, 2>(vh, table, bs, start, end, wg, stride, ag, p); break;
      default: pv_avx2<DC, 3>(vh, table, bs, start, end, wg, stride, ag, p);
    }
  }
}
#endif


#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// Scores of one float32 query row q (already scaled) against rows j_lo..j_hi-1 of a 16-key
// block of float32 or bfloat16 keys E (row stride DC): each key's products summed in lanes
// (a chain of FMAs over the row's vectors), then the keys' lanes reduced together
// (tmk::reduce16, or reduce8 below) instead of one horizontal sum per key, which was most of
// dot_row's time. A key's operations do not depend on the other keys or on the batch.
#if !defined(__AVX512F__)
inline __m256 reduce8(const __m256 (&v)[8]) {  // lane j: the sum of v[j]'s lanes
  __m256 t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                       _mm256_permute2f128_ps(u[0], u[1], 0x31));
}
#endif

template <int64_t DC, typename E>
[[gnu::always_inline]]
inline void qk_block_f32(const float* q, const E* kb, int64_t j_lo, int64_t j_hi, float* out) {
#if defined(__AVX512F__)
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < DC; c += 16) {
    const __m512 qc = _mm512_loadu_ps(q + c);
    for (int j = 0; j < 16; ++j)
      if (j >= j_lo && j < j_hi) acc[j] = _mm512_fmadd_ps(qc, tmk::load16(kb + j * DC + c), acc[j]);
  }
  const __mmask16 keep = __mmask16(((1u << j_hi) - 1u) & ~((1u << j_lo) - 1u));
  _mm512_mask_storeu_ps(out, keep, tmk::reduce16(acc, tmk::vadd));
#else
  for (int half = 0; half < 2; ++half) {
    const int64_t lo = std::max<int64_t>(j_lo - 8 * half, 0), hi = std::min<int64_t>(j_hi - 8 * half, 8);
    if (lo >= hi) continue;
    const E* kh = kb + 8 * half * DC;
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < DC; c += 8) {
      const __m256 qc = _mm256_loadu_ps(q + c);
      for (int j = 0; j < 8; ++j)
        if (j >= lo && j < hi) acc[j] = _mm256_fmadd_ps(qc, tmk::load8(kh + j * DC + c), acc[j]);
    }
    alignas(32) float s[8];
    _mm256_store_ps(s, reduce8(acc));
    for (int64_t j = lo; j < hi; ++j) out[8 * half + j] = s[j];
  }
#endif
}
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
      if (p + 1 < n_items) {
        const Item<E> nx = view(item_of(p + 1));
        const Item<E> prev = p > 0 ? view(item_of(p - 1)) : Item<E>{};
        const bool seen = p > 0 && prev.table == nx.table && prev.kh == nx.kh;
        if (!seen) pf.reset(nx, bs, block_elems);
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

// Work blocks of rows: a prefill's consecutive rows of one sequence (same start, ends one apart)
// up to row_block of them together, every other row alone; with none to join, the loop
// without blocks.
template <typename T, typename E, int64_t DC>
void paged_decode(const T* q, int64_t q_tok, T* out, const E* kc, const E* vc, int64_t kv_head,
                  int64_t bs, int64_t head_dim, const int64_t* tables, int64_t table_stride,
                  const int64_t* row_seq, const int64_t* bounds, int64_t B, int64_t Hq,
                  int64_t Hk, float scale, float* scratch, int64_t max_keys, int threads) {
  const int64_t rb = row_block<E, DC>(Hq / Hk, bs);
  auto follows = [&](int64_t b) {  // row b continues row b - 1's prefill
    return row_seq[b] == row_seq[b - 1] && bounds[2 * b] == bounds[2 * b - 2] &&
           bounds[2 * b + 1] == bounds[2 * b - 1] + 1;
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
