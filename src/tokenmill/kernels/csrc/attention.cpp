// Paged attention for the CPU: every query row (decode or prefill) read straight from the
// paged KV cache, no gather. Part of the library kernels/cpu.py builds from csrc/.
#include <omp.h>

#include "kv8.h"
#include "tm_kernels.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

namespace kv8 = tmk::kv8;
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

// acc[g][0:DC] = sum over keys p in [start, end) of w[g][p - start] * V[p] for GC query heads
// (w rows `stride` apart), V bfloat16 rows of the paged cache (block size bs). Each V row is
// widened once and feeds all GC heads from registers; the generic loop widened it per head
// and kept the sums in memory (~2x the operations). FMA: one rounding per term.
template <int64_t DC, int GC, typename PF>
inline void pv_bf16(const uint16_t* vh, const int64_t* table, int64_t bs, int64_t start,
                    int64_t end, const float* w, int64_t stride, float* acc, PF* pf) {
  constexpr int NV = DC / 16;
  __m512 a[GC][NV];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NV; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
    if (pf) pf->step(true);
    const uint16_t* vb = vh + table[p0 / bs] * bs * DC;
    for (int64_t p = std::max(p0, start); p < std::min(p0 + bs, end); ++p) {
      const uint16_t* vrow = vb + (p - p0) * DC;
      __m512 v[NV];
      for (int c = 0; c < NV; ++c)
        v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vrow + 16 * c))), 16));
      for (int g = 0; g < GC; ++g) {
        const __m512 wg = _mm512_set1_ps(w[g * stride + (p - start)]);
        for (int c = 0; c < NV; ++c) a[g][c] = _mm512_fmadd_ps(wg, v[c], a[g][c]);
      }
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + g * DC + 16 * c, a[g][c]);
}

// pv_bf16 over G heads, up to 4 at a time for head dim 64 and 2 for 128 (the sums then fill
// 16 registers next to the widened V row).
template <int64_t DC, typename PF>
inline void pv_heads_bf16(const uint16_t* vh, const int64_t* table, int64_t bs, int64_t start,
                          int64_t end, const float* w, int64_t stride, int64_t G, float* acc,
                          PF& pf) {
  constexpr int64_t GMAX = DC <= 64 ? 4 : 2;
  for (int64_t g = 0; g < G; g += GMAX) {
    const float* wg = w + g * stride;
    float* ag = acc + g * DC;
    PF* p = g == 0 ? &pf : nullptr;  // the next item's V during the first pass
    switch (std::min(GMAX, G - g)) {
      case 1: pv_bf16<DC, 1>(vh, table, bs, start, end, wg, stride, ag, p); break;
      case 2: pv_bf16<DC, 2>(vh, table, bs, start, end, wg, stride, ag, p); break;
      case 3: pv_bf16<DC, (GMAX >= 3 ? 3 : 1)>(vh, table, bs, start, end, wg, stride, ag, p); break;
      default: pv_bf16<DC, GMAX>(vh, table, bs, start, end, wg, stride, ag, p);
    }
  }
}
#endif

// Attention straight from the paged cache, one query row at a time, no gather: decode rows
// and prefill rows alike (a prefill row is a query that attends to the keys up to its own
// position, written to the cache before this call). q [B, Hq, D] (row stride q_tok, head
// stride D), out [B, Hq, D] contiguous; k/v caches [Hk, n_blocks, bs, D] (head stride
// kv_head); tables [S, table_stride] block ids per sequence, row_seq [B] each row's sequence
// (null: row b is sequence b); bounds [B, 2] = the key positions [start, end) each row attends
// to. One work item per (row, KV head): its G = Hq / Hk query heads share every K and V row
// they read. Scores live in float32 scratch [threads, G * max_keys]; the
// softmax and both products run in float32.
// The paged-cache view of one work item: a row's keys [start, end) under KV head h.
template <typename E>
struct Item {
  const int64_t* table;  // the row's sequence's block ids
  const E* kh;           // K and V caches of head h, n_blocks blocks
  const E* vh;
  int64_t start, end;
};

// Software prefetch of the next item's K and V blocks into L2, issued while the current item
// computes: its K a block per call while the scores run, its V a block per call while the
// weighted sum does, so the requests are spread over the whole item instead of bunched (which
// filled the miss queues: the hardware prefetcher does not follow 2 KB blocks, scattered or
// not). 64 decode rows x 192 keys over 30 layers' caches (benchmarks/cpu_kernels.py), int8
// cache: ~360 -> ~220 us a layer with contiguous blocks and ~290 scattered (~180 when the
// cache is warm); before any prefetch the bfloat16 cache took ~650 scattered.
template <typename E>
struct Prefetch {
  Item<E> it{};
  int64_t k = 0, v = 0, last = -1, block_bytes = 0;  // the next K and V blocks to fetch
  void reset(const Item<E>& next, int64_t bs, int64_t block_elems) {
    it = next;
    k = v = next.start / bs;
    last = next.end > next.start ? (next.end - 1) / bs : -1;
    block_bytes = block_elems * int64_t(sizeof(E));
  }
  void step(bool value) {
    int64_t& b = value ? v : k;
    if (b > last) return;
    const char* h = reinterpret_cast<const char*>(value ? it.vh : it.kh);
    h += it.table[b++] * block_bytes;
    for (int64_t o = 0; o < block_bytes; o += 64) __builtin_prefetch(h + o, 0, 2);
  }
  void finish() {  // whatever the loops did not reach
    while (k <= last) step(false);
    while (v <= last) step(true);
  }
};

// sc[g][0:n] = scale * (q_g . K[p]) for the item's keys p, n = end - start, G query heads
// (row q, heads D apart); rows of sc `stride` apart. Prefetches the next item as it goes.
template <typename T, int64_t DC>
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
  // keys block by block: one table lookup (and division) per block, not per key
  for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
    pf.step(false);
    const T* kb = it.kh + it.table[p0 / bs] * bs * D;
    for (int64_t p = std::max(p0, start); p < std::min(p0 + bs, end); ++p) {
      const T* krow = kb + (p - p0) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qg[d] * load(krow, d);
        sc[g * stride + (p - start)] = s;
      }
    }
  }
}

// Softmax in place over each of G rows of n scores (rows `stride` apart).
inline void softmax_rows(float* sc, int64_t n, int64_t G, int64_t stride) {
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
inline void weighted_sum(const Item<T>& it, int64_t bs, int64_t D, int64_t G, const float* w,
                         int64_t stride, float* acc, Prefetch<T>& pf) {
#if defined(__AVX512BF16__)
  if constexpr (sizeof(T) == 2 && DC % 16 == 0 && DC > 0) {
    pv_heads_bf16<DC>(reinterpret_cast<const uint16_t*>(it.vh), it.table, bs, it.start, it.end,
                      w, stride, G, acc, pf);
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

// ---- The int8 cache (kv8.h) ----
// The query heads of a row quantized as the keys are (groups of 32), with each group's integer
// sum start -128 * sum(q) (the keys are stored + 128, unsigned for vpdpbusd).
struct Q8 {
  int8_t q[16 * 256];
  float d[16 * 256 / kv8::GRP];
  int32_t corr[16 * 256 / kv8::GRP];
};

template <typename T>
inline void quantize_query(const T* q, int64_t D, int64_t G, Q8& out) {
  const int64_t NG = D / kv8::GRP;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < NG; ++c) {
      float x[kv8::GRP];
      for (int64_t i = 0; i < kv8::GRP; ++i) x[i] = load(q + g * D, c * kv8::GRP + i);
      const int64_t k = g * NG + c;
      out.corr[k] = -128 * tmk::quantize_group(x, out.q + g * D + c * kv8::GRP, &out.d[k]);
    }
}

inline int32_t quad(const int8_t* p) {  // 4 query bytes as the dword vpdpbusd broadcasts
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Scores of one quantized query head (q8, its group scales qd and starts corr) against keys
// j_lo..j_hi-1 of sub-block sb, written to out[j_lo..j_hi-1]: per group of 32 dims an exact
// integer dot product, then acc += float(dot) * (d_key * d_query). With VNNI a group is 8
// vpdpbusd giving all 16 keys at once. The scalar loop performs the same float operations.
template <int64_t DC>
inline void qk_sub_int8(const int8_t* q8, const float* qd, const int32_t* corr, const int8_t* sb,
                        int64_t D, int64_t j_lo, int64_t j_hi, float* out) {
  const float* ks = reinterpret_cast<const float*>(sb + kv8::SUB * D);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if constexpr (DC > 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < DC / kv8::GRP; ++c) {
      const int8_t* qc = q8 + kv8::GRP * c;
      const int8_t* kc = sb + 512 * c;  // 8 vectors of 64 bytes per group
      __m512i t0 = _mm512_set1_epi32(corr[c]), t1 = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        t0 = _mm512_dpbusd_epi32(t0, _mm512_loadu_si512(kc + 64 * j),
                                 _mm512_set1_epi32(quad(qc + 4 * j)));
        t1 = _mm512_dpbusd_epi32(t1, _mm512_loadu_si512(kc + 64 * (j + 4)),
                                 _mm512_set1_epi32(quad(qc + 16 + 4 * j)));
      }
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)),
                            _mm512_mul_ps(_mm512_loadu_ps(ks + kv8::SUB * c),
                                          _mm512_set1_ps(qd[c])),
                            acc);
    }
    const __mmask16 keep = __mmask16(((1u << j_hi) - 1u) & ~((1u << j_lo) - 1u));
    _mm512_mask_storeu_ps(out, keep, acc);
    return;
  }
#endif
  for (int64_t u = j_lo; u < j_hi; ++u) {
    float acc = 0.f;
    for (int64_t c = 0; c < D / kv8::GRP; ++c) {
      int32_t t = corr[c];
      for (int64_t i = 0; i < kv8::GRP; ++i) {
        const int64_t dim = kv8::GRP * c + i;
        t += int32_t(uint8_t(sb[dim / 4 * 64 + u * 4 + dim % 4])) * q8[dim];
      }
      acc = std::fma(float(t), ks[kv8::SUB * c + u] * qd[c], acc);
    }
    out[u] = acc;
  }
}

// scores() for the int8 cache.
template <typename T, int64_t DC>
inline void scores_int8(const T* q, const Item<int8_t>& it, int64_t bs, int64_t D, int64_t G,
                        float scale, float* sc, int64_t stride, Q8& q8, Prefetch<int8_t>& pf) {
  const int64_t start = it.start, end = it.end, NG = D / kv8::GRP;
  quantize_query(q, D, G, q8);
  for (int64_t p0 = start - start % kv8::SUB; p0 < end; p0 += kv8::SUB) {
    if (p0 % bs == 0 || p0 <= start) pf.step(false);  // a block at a time
    const int8_t* sb = it.kh + kv8::sub_offset(it.table, p0, bs, D);
    const int64_t lo = std::max(p0, start) - p0, hi = std::min(p0 + kv8::SUB, end) - p0;
    for (int64_t g = 0; g < G; ++g)
      qk_sub_int8<DC>(q8.q + g * D, q8.d + g * NG, q8.corr + g * NG, sb, D, lo, hi,
                      sc + g * stride + (p0 - start));
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = sc + g * stride;
#pragma omp simd
    for (int64_t i = 0; i < end - start; ++i) sg[i] *= scale;
  }
}

// weighted_sum() for the int8 cache: per sub-block the weights are multiplied by the 16 keys'
// V scales (ws = w * d, one per key and group), then each V row is widened to float once and
// acc += ws * v, in key order, for the GC heads. The generic loop (any D, no AVX-512) performs
// the same float operations.
template <int64_t DC, int GC>
inline void pv_int8(const Item<int8_t>& it, int64_t bs, const float* w, int64_t stride,
                    float* acc, Prefetch<int8_t>* pf) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  constexpr int NV = DC / 16, NG = DC / kv8::GRP;
  __m512 a[GC][NV];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NV; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t p0 = it.start - it.start % kv8::SUB; p0 < it.end; p0 += kv8::SUB) {
    if (pf && (p0 % bs == 0 || p0 <= it.start)) pf->step(true);
    const int8_t* sb = it.vh + kv8::sub_offset(it.table, p0, bs, DC);
    const float* vs = reinterpret_cast<const float*>(sb + kv8::SUB * DC);
    const int64_t lo = std::max(p0, it.start) - p0, hi = std::min(p0 + kv8::SUB, it.end) - p0;
    const __mmask16 keep = __mmask16(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    alignas(64) float ws[GC][NG][kv8::SUB];
    for (int g = 0; g < GC; ++g) {
      const __m512 wr = _mm512_maskz_loadu_ps(keep, w + g * stride + (p0 - it.start));
      for (int c = 0; c < NG; ++c)
        _mm512_store_ps(ws[g][c], _mm512_mul_ps(wr, _mm512_loadu_ps(vs + kv8::SUB * c)));
    }
    for (int64_t u = lo; u < hi; ++u) {
      const int8_t* vrow = sb + u * DC;
      __m512 v[NV];
      for (int c = 0; c < NV; ++c)
        v[c] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vrow + 16 * c))));
      for (int g = 0; g < GC; ++g)
        for (int c = 0; c < NV; ++c)
          a[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(ws[g][c / 2][u]), v[c], a[g][c]);
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + g * DC + 16 * c, a[g][c]);
#endif
}

template <int64_t DC>
inline void weighted_sum_int8(const Item<int8_t>& it, int64_t bs, int64_t D, int64_t G,
                              const float* w, int64_t stride, float* acc,
                              Prefetch<int8_t>& pf) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (DC > 0) {
    constexpr int64_t GMAX = DC <= 64 ? 4 : 2;
    for (int64_t g = 0; g < G; g += GMAX) {
      const float* wg = w + g * stride;
      float* ag = acc + g * DC;
      Prefetch<int8_t>* p = g == 0 ? &pf : nullptr;  // the next item's V during the first
      switch (std::min(GMAX, G - g)) {
        case 1: pv_int8<DC, 1>(it, bs, wg, stride, ag, p); break;
        case 2: pv_int8<DC, 2>(it, bs, wg, stride, ag, p); break;
        case 3: pv_int8<DC, (GMAX >= 3 ? 3 : 1)>(it, bs, wg, stride, ag, p); break;
        default: pv_int8<DC, GMAX>(it, bs, wg, stride, ag, p);
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.f;
  for (int64_t p0 = it.start - it.start % kv8::SUB; p0 < it.end; p0 += kv8::SUB) {
    if (p0 % bs == 0 || p0 <= it.start) pf.step(true);
    const int8_t* sb = it.vh + kv8::sub_offset(it.table, p0, bs, D);
    const float* vs = reinterpret_cast<const float*>(sb + kv8::SUB * D);
    for (int64_t u = std::max(p0, it.start) - p0; u < std::min(p0 + kv8::SUB, it.end) - p0; ++u)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < D / kv8::GRP; ++c) {
          const float ws = w[g * stride + (p0 + u - it.start)] * vs[kv8::SUB * c + u];
          for (int64_t i = 0; i < kv8::GRP; ++i) {
            float& a = acc[g * D + kv8::GRP * c + i];
            a = std::fma(ws, float(sb[u * D + kv8::GRP * c + i]), a);
          }
        }
  }
}

// Attention straight from the paged cache, one query row at a time, no gather: decode rows
// and prefill rows alike (a prefill row is a query that attends to the keys up to its own
// position, written to the cache before this call). q [B, Hq, D] (row stride q_tok, head
// stride D), out [B, Hq, D] contiguous; k/v caches [Hk, n_blocks, bs, D] (head stride
// kv_head); tables [S, table_stride] block ids per sequence, row_seq [B] each row's sequence
// (null: row b is sequence b); bounds [B, 2] = the key positions [start, end) each row attends
// to. One work item per (row, KV head): its G = Hq / Hk query heads share every K and V row
// they read. Scores live in float32 scratch [threads, G * max_keys]; the softmax and both
// products run in float32.
// E: the cache's element, T or int8_t (kv8.h's layout, kv_head in bytes).
template <typename T, typename E, int64_t DC>  // DC: the head dim when fixed at compile time
void paged_decode(const T* q, int64_t q_tok, T* out, const E* kc, const E* vc, int64_t kv_head,
                  int64_t bs, int64_t head_dim, const int64_t* tables, int64_t table_stride,
                  const int64_t* row_seq, const int64_t* bounds, int64_t B, int64_t Hq,
                  int64_t Hk, float scale, float* scratch, int64_t max_keys, int threads) {
  constexpr bool INT8 = std::is_same_v<E, int8_t>;
  const int64_t G = Hq / Hk, D = DC ? DC : head_dim, n_items = B * Hk;
  const int64_t block_elems = INT8 ? kv8::block_bytes(bs, D) : bs * D;
  // Items taken from both ends in turn: each thread's share is two contiguous runs, one from
  // the front and one from the back, so a prefill's short and long rows even out.
  auto item_of = [&](int64_t p) { return (p & 1) ? n_items - 1 - p / 2 : p / 2; };
  auto view = [&](int64_t item) {
    const int64_t b = item / Hk, h = item % Hk;
    return Item<E>{tables + (row_seq ? row_seq[b] : b) * table_stride, kc + h * kv_head,
                   vc + h * kv_head, bounds[2 * b], bounds[2 * b + 1]};
  };
#pragma omp parallel num_threads(threads)
  {
    float* sc = scratch + int64_t(omp_get_thread_num()) * G * max_keys;
    float qf[16 * 256], acc[16 * 256];  // G * D <= 4096, checked by the caller
    Prefetch<E> pf;
    Q8 q8;  // the int8 cache's quantized query (unused otherwise)
#pragma omp for schedule(static)
    for (int64_t p = 0; p < n_items; ++p) {
      // Under the static schedule a thread's p run consecutively, so p + 1 is its next item
      // (or, past its share, another thread's first: harmless). A prefill's rows of one
      // sequence share blocks, in cache after the first: as p + 1 comes from the same end as
      // p - 1, when both read the same sequence and head there is nothing to fetch.
      const int64_t item = item_of(p), b = item / Hk, h = item % Hk;
      const Item<E> it = view(item);
      if (p + 1 < n_items) {
        const Item<E> nx = view(item_of(p + 1));
        const Item<E> prev = p > 0 ? view(item_of(p - 1)) : Item<E>{};
        const bool seen = p > 0 && prev.table == nx.table && prev.kh == nx.kh;
        if (!seen) pf.reset(nx, bs, block_elems);
      }
      const T* qrow = q + b * q_tok + h * G * D;
      if constexpr (INT8) {
        scores_int8<T, DC>(qrow, it, bs, D, G, scale, sc, max_keys, q8, pf);
        softmax_rows(sc, it.end - it.start, G, max_keys);
        weighted_sum_int8<DC>(it, bs, D, G, sc, max_keys, acc, pf);
      } else {
        scores<T, DC>(qrow, it, bs, D, G, scale, sc, max_keys, qf, pf);
        softmax_rows(sc, it.end - it.start, G, max_keys);
        weighted_sum<T, DC>(it, bs, D, G, sc, max_keys, acc, pf);
      }
      pf.finish();
      T* orow = out + (b * Hq + h * G) * D;
#pragma omp simd
      for (int64_t i = 0; i < G * D; ++i) store(orow, i, acc[i]);
    }
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
