// The float (bfloat16 and float32) caches' loops for attention.cpp: a query row's scores
// against a block of 16 keys (AVX512-BF16 dot products on bfloat16 keys; float32 lane sums
// reduced together otherwise) and the weighted V sum with its accumulators in registers
// (AVX-512 for either element type; AVX2 for float32). Included by attention.cpp only.
#pragma once
#include <algorithm>
#include <cstdint>

#include "tm_kernels.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace tmk::attn {

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

}  // namespace tmk::attn
