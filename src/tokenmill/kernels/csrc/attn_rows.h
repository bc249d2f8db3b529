// Prefill rows in blocks for attention.cpp: the weighted sum of a block of a prefill's
// consecutive rows, and how many rows a block may take. Included by attention.cpp only.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attn_paged.h"
#include "kv8.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tmk::attn {

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Prefill rows in blocks: RB consecutive rows of one sequence (their ends consecutive) share
// every key and value they read, so one work item takes them together. Each row's scores and
// softmax are its own, as alone; the weighted sum widens each V row to float once for the
// block's RB x G query heads (alone, once for G: the widening was ~40% of that loop), then
// performs per head exactly the operations of pv_int8 / pv_vec in key order, so a row gets
// the bits it gets alone. A head whose row ends earlier in the block meets zero weights for
// the keys past its end: fma(0, v, acc) is acc (acc starts at +0 and never becomes -0).
constexpr int64_t KC = 16;  // keys per chunk: an int8 sub-block, or a slice of a bf16 block

// acc[r][0:DC] += sum over u in [lo, hi) of ws[r][c / 2][u] * vf[u][c] for CH heads r.
template <int64_t DC, int CH>
inline void pv_rows_chunk(const float* vf, const float* ws, int64_t lo, int64_t hi, float* acc) {
  constexpr int NV = DC / 16, NG = DC / 32;
  __m512 a[CH][NV];
  for (int r = 0; r < CH; ++r)
    for (int c = 0; c < NV; ++c) a[r][c] = _mm512_loadu_ps(acc + r * DC + 16 * c);
  for (int64_t u = lo; u < hi; ++u) {
    __m512 v[NV];
    for (int c = 0; c < NV; ++c) v[c] = _mm512_load_ps(vf + u * DC + 16 * c);
    for (int r = 0; r < CH; ++r)
      for (int c = 0; c < NV; ++c)
        a[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(ws[(r * NG + c / 2) * KC + u]), v[c], a[r][c]);
  }
  for (int r = 0; r < CH; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + r * DC + 16 * c, a[r][c]);
}

// The block's weighted sums: acc[r][0:DC] for its RH = rows x G heads (r = row * G + g),
// w[r] the weights (rows `stride` apart, key p at p - start), row_end[row] each row's end;
// `it` spans the block's keys, up to its last row's end. E: int8_t (kv8.h's layout) or
// bfloat16; bs a multiple of KC.
template <typename E, int64_t DC>
void pv_rows(const Item<E>& it, int64_t bs, int64_t RH, int64_t G, const int64_t* row_end,
             const float* w, int64_t stride, float* acc, Prefetch<E>& pf) {
  constexpr int64_t NG = DC / 32, CH = DC <= 64 ? 6 : 2;
  alignas(64) float vf[KC * DC];
  alignas(64) float ws[2048 / DC * NG * KC];  // RH * DC <= 2048: see row_block
  for (int64_t i = 0; i < RH * DC; ++i) acc[i] = 0.f;
  for (int64_t p0 = it.start - it.start % KC; p0 < it.end; p0 += KC) {
    if (p0 % bs == 0 || p0 <= it.start) pf.step(true);
    const int64_t lo = std::max(p0, it.start) - p0, hi = std::min(p0 + KC, it.end) - p0;
    const float* vs = nullptr;  // the int8 cache's V scales [NG][KC]
    if constexpr (std::is_same_v<E, int8_t>) {
      const int8_t* sb = it.vh + kv8::sub_offset(it.table, p0, bs, DC);
      vs = reinterpret_cast<const float*>(sb + kv8::SUB * DC);
      for (int64_t u = lo; u < hi; ++u)
        for (int c = 0; c < DC / 16; ++c)
          _mm512_store_ps(vf + u * DC + 16 * c,
                          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                              reinterpret_cast<const __m128i*>(sb + u * DC + 16 * c)))));
    } else {
      const uint16_t* vb = reinterpret_cast<const uint16_t*>(it.vh) +
                           (it.table[p0 / bs] * bs + p0 % bs) * DC;
      for (int64_t u = lo; u < hi; ++u)
        for (int c = 0; c < DC / 16; ++c)
          _mm512_store_ps(vf + u * DC + 16 * c,
                          _mm512_castsi512_ps(_mm512_slli_epi32(
                              _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(vb + u * DC + 16 * c))),
                              16)));
    }
    for (int64_t r = 0; r < RH; ++r) {
      const int64_t rhi = std::min(hi, row_end[r / G] - p0);
      const __mmask16 keep =
          rhi > lo ? __mmask16(((1u << rhi) - 1u) & ~((1u << lo) - 1u)) : __mmask16(0);
      const __m512 wr = _mm512_maskz_loadu_ps(keep, w + r * stride + (p0 - it.start));
      for (int64_t c = 0; c < NG; ++c)
        _mm512_store_ps(ws + (r * NG + c) * KC,
                        vs ? _mm512_mul_ps(wr, _mm512_loadu_ps(vs + kv8::SUB * c)) : wr);
    }
    for (int64_t r0 = 0; r0 < RH; r0 += CH) {
      const float* wr = ws + r0 * NG * KC;
      float* ar = acc + r0 * DC;
      switch (std::min<int64_t>(CH, RH - r0)) {
        case 1: pv_rows_chunk<DC, 1>(vf, wr, lo, hi, ar); break;
        case 2: pv_rows_chunk<DC, 2>(vf, wr, lo, hi, ar); break;
        case 3: pv_rows_chunk<DC, (CH >= 3 ? 3 : 1)>(vf, wr, lo, hi, ar); break;
        case 4: pv_rows_chunk<DC, (CH >= 4 ? 4 : 1)>(vf, wr, lo, hi, ar); break;
        case 5: pv_rows_chunk<DC, (CH >= 5 ? 5 : 1)>(vf, wr, lo, hi, ar); break;
        default: pv_rows_chunk<DC, CH>(vf, wr, lo, hi, ar);
      }
    }
  }
}
#define TM_ATTN_ROW_BLOCKS 1
#endif

// Rows per work item for prefill row blocks: 1 (rows alone) where pv_rows does not apply; else
// up to 8, the block's heads' sums (rows x G x D floats) within 8 KB.
template <typename E, int64_t DC>
constexpr int64_t row_block(int64_t G, int64_t bs) {
#if defined(TM_ATTN_ROW_BLOCKS)
  if constexpr (DC > 0 && (std::is_same_v<E, int8_t> || std::is_same_v<E, uint16_t>)) {
    if (bs % KC == 0) return std::clamp<int64_t>(2048 / (G * DC), 1, 8);
  }
#endif
  (void)G;
  (void)bs;
  return 1;
}

}  // namespace tmk::attn
