// Paged attention for the CPU: every query row (decode or prefill) read straight from the
// paged KV cache, no gather. Part of the library kernels/cpu.py builds from csrc/.
#include <omp.h>

#include "tm_kernels.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using tm::exp_neg;
using tm::load;
using tm::round_to;
using tm::store;

#if defined(__AVX512BF16__)
// 16 vectors of 16 floats -> one vector of their 16 sums (r[j] = sum of v[j]): pairwise
// unpacks within 128-bit lanes, then a 4 x 4 transpose of the lanes; 24 shuffles and adds
// for 16 sums instead of a horizontal sum (~8 ops) each.
inline __m512 sum16(const __m512 (&v)[16]) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}

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
template <int64_t DC, int GC>
inline void pv_bf16(const uint16_t* vh, const int64_t* table, int64_t bs, int64_t start,
                    int64_t end, const float* w, int64_t stride, float* acc) {
  constexpr int NV = DC / 16;
  __m512 a[GC][NV];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NV; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
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
template <int64_t DC>
inline void pv_heads_bf16(const uint16_t* vh, const int64_t* table, int64_t bs, int64_t start,
                          int64_t end, const float* w, int64_t stride, int64_t G, float* acc) {
  constexpr int64_t GMAX = DC <= 64 ? 4 : 2;
  for (int64_t g = 0; g < G; g += GMAX) {
    const float* wg = w + g * stride;
    float* ag = acc + g * DC;
    switch (std::min(GMAX, G - g)) {
      case 1: pv_bf16<DC, 1>(vh, table, bs, start, end, wg, stride, ag); break;
      case 2: pv_bf16<DC, 2>(vh, table, bs, start, end, wg, stride, ag); break;
      case 3: pv_bf16<DC, (GMAX >= 3 ? 3 : 1)>(vh, table, bs, start, end, wg, stride, ag); break;
      default: pv_bf16<DC, GMAX>(vh, table, bs, start, end, wg, stride, ag);
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
template <typename T, int64_t DC>  // DC: the head dim when fixed at compile time, else 0
void paged_decode(const T* q, int64_t q_tok, T* out, const T* kc, const T* vc, int64_t kv_head,
                  int64_t bs, int64_t head_dim, const int64_t* tables, int64_t table_stride,
                  const int64_t* row_seq, const int64_t* bounds, int64_t B, int64_t Hq,
                  int64_t Hk, float scale, float* scratch, int64_t max_keys, int threads) {
  const int64_t G = Hq / Hk, D = DC ? DC : head_dim;
#pragma omp parallel num_threads(threads)
  {
    float* sc = scratch + int64_t(omp_get_thread_num()) * G * max_keys;
    float qf[16 * 256], acc[16 * 256];  // G * D <= 4096, checked by the caller
#pragma omp for schedule(static)
    for (int64_t p = 0; p < B * Hk; ++p) {
      // Items taken from both ends in turn: each thread's share is two contiguous runs, one
      // from the front and one from the back, so a prefill's short and long rows even out.
      const int64_t item = (p & 1) ? B * Hk - 1 - p / 2 : p / 2;
      const int64_t b = item / Hk, h = item % Hk;
      const int64_t start = bounds[2 * b], end = bounds[2 * b + 1], n = end - start;
      const int64_t* table = tables + (row_seq ? row_seq[b] : b) * table_stride;
      const T* kh = kc + h * kv_head;
      const T* vh = vc + h * kv_head;
      for (int64_t g = 0; g < G; ++g) {
        const T* qrow = q + b * q_tok + (h * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load(qrow, d) * scale;
      }
#if defined(__AVX512BF16__)
      // bfloat16 with a head dim of 64 or 128 and 16-key blocks: 16 scores at a time (the
      // per-key horizontal sums were ~60% of the kernel); the scale is applied after.
      constexpr bool fast_qk = sizeof(T) == 2 && DC % 32 == 0 && DC > 0;
      if (fast_qk && bs == 16) {
        for (int64_t g = 0; g < G; ++g) {
          const uint16_t* qrow = reinterpret_cast<const uint16_t*>(q + b * q_tok + (h * G + g) * D);
          for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
            const uint16_t* kb = reinterpret_cast<const uint16_t*>(kh + table[p0 / bs] * bs * D);
            qk_block_bf16<DC ? DC : 32>(qrow, kb, std::max(p0, start) - p0,
                                        std::min(p0 + bs, end) - p0,
                                        sc + g * max_keys + (p0 - start));
          }
          float* sg = sc + g * max_keys;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) sg[i] *= scale;
        }
      } else
#endif
      // keys block by block: one table lookup (and division) per block, not per key
      for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
        const T* kb = kh + table[p0 / bs] * bs * D;
        for (int64_t p = std::max(p0, start); p < std::min(p0 + bs, end); ++p) {
          const T* krow = kb + (p - p0) * D;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * load(krow, d);
            sc[g * max_keys + (p - start)] = s;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = sc + g * max_keys;
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
#if defined(__AVX512BF16__)
      if constexpr (sizeof(T) == 2 && DC % 16 == 0 && DC > 0) {
        pv_heads_bf16<DC ? DC : 16>(reinterpret_cast<const uint16_t*>(vh), table, bs, start,
                                    end, sc, max_keys, G, acc);
      } else
#endif
      {
      for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.f;
      for (int64_t p0 = start - start % bs; p0 < end; p0 += bs) {
        const T* vb = vh + table[p0 / bs] * bs * D;
        for (int64_t p = std::max(p0, start); p < std::min(p0 + bs, end); ++p) {
          const T* vrow = vb + (p - p0) * D;
          for (int64_t g = 0; g < G; ++g) {
            const float w = sc[g * max_keys + (p - start)];
            float* __restrict ag = acc + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += w * load(vrow, d);
          }
        }
      }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* orow = out + (b * Hq + h * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) store(orow, d, acc[g * D + d]);
      }
    }
  }
}

}  // namespace

extern "C" {

#define TM_PAGED_DECODE(NAME, T)                                                              \
  void NAME(const T* q, int64_t q_tok, T* out, const T* kc, const T* vc, int64_t kv_head,     \
            int64_t bs, int64_t D, const int64_t* tables, int64_t table_stride,               \
            const int64_t* row_seq, const int64_t* bounds, int64_t B, int64_t Hq, int64_t Hk,  \
            float scale, float* scratch, int64_t max_keys, int threads) {                     \
    auto f = D == 64 ? paged_decode<T, 64> : D == 128 ? paged_decode<T, 128> : paged_decode<T, 0>;  \
    f(q, q_tok, out, kc, vc, kv_head, bs, D, tables, table_stride, row_seq, bounds, B, Hq, Hk, \
      scale, scratch, max_keys, threads);                                                     \
  }
TM_PAGED_DECODE(tm_paged_decode_bf16, uint16_t)
TM_PAGED_DECODE(tm_paged_decode_f32, float)

}  // extern "C"
