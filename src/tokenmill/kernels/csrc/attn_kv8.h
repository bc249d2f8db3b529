// Attention over the int8 KV cache (`--kv-cache-dtype int8`, layout in kv8.h): the query
// quantized as the keys are, integer scores with vpdpbusd, the weighted V sum in float32.
// The int8 counterparts of attention.cpp's scores() and weighted_sum(); included there only.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attn_paged.h"
#include "kv8.h"
#include "tm_kernels.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace tmk::attn {

using tmk::load;

// The query heads of a row quantized as the keys are (groups of 32), with each group's integer
// sum start -128 * sum(q) (the keys are stored + 128, unsigned for vpdpbusd).
struct Q8 {
  int8_t q[16 * 256];
  float d[16 * 256 / kv8::GRP];
  int32_t corr[16 * 256 / kv8::GRP];
};

template <typename T>
[[gnu::always_inline]]
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

// Scores of GC quantized query heads (q8, D apart; their group scales qd and starts corr, NG
// apart) against keys j_lo..j_hi-1 of sub-block sb, head h's written to out + h * stride at
// [j_lo, j_hi): per group of 32 dims an exact integer dot product, then acc += float(dot) *
// (d_key * d_query). With VNNI a group is 8 vpdpbusd per head giving all 16 keys at once; the
// heads share the key loads and their chains interleave (one head at a time, the loop waited
// on the vpdpbusd latency). The scalar loop performs the same float operations per head.
template <int64_t DC, int GC>
[[gnu::always_inline]]
inline void qk_sub_int8(const int8_t* q8, const float* qd, const int32_t* corr, int64_t NG,
                        const int8_t* sb, int64_t D, int64_t j_lo, int64_t j_hi, float* out,
                        int64_t stride) {
  const float* ks = reinterpret_cast<const float*>(sb + kv8::SUB * D);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if constexpr (DC > 0) {
    __m512 acc[GC];
    for (int h = 0; h < GC; ++h) acc[h] = _mm512_setzero_ps();
    for (int c = 0; c < DC / kv8::GRP; ++c) {
      const int8_t* kc = sb + 512 * c;  // 8 vectors of 64 bytes per group
      __m512i t0[GC], t1[GC];
      for (int h = 0; h < GC; ++h) {
        t0[h] = _mm512_set1_epi32(corr[h * NG + c]);
        t1[h] = _mm512_setzero_si512();
      }
      for (int j = 0; j < 4; ++j) {
        const __m512i k0 = _mm512_loadu_si512(kc + 64 * j);
        const __m512i k1 = _mm512_loadu_si512(kc + 64 * (j + 4));
        for (int h = 0; h < GC; ++h) {
          const int8_t* qc = q8 + h * D + kv8::GRP * c;
          t0[h] = _mm512_dpbusd_epi32(t0[h], k0, _mm512_set1_epi32(quad(qc + 4 * j)));
          t1[h] = _mm512_dpbusd_epi32(t1[h], k1, _mm512_set1_epi32(quad(qc + 16 + 4 * j)));
        }
      }
      const __m512 kd = _mm512_loadu_ps(ks + kv8::SUB * c);
      for (int h = 0; h < GC; ++h)
        acc[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0[h], t1[h])),
                                 _mm512_mul_ps(kd, _mm512_set1_ps(qd[h * NG + c])), acc[h]);
    }
    const __mmask16 keep = __mmask16(((1u << j_hi) - 1u) & ~((1u << j_lo) - 1u));
    for (int h = 0; h < GC; ++h) _mm512_mask_storeu_ps(out + h * stride, keep, acc[h]);
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  // AVX2: 8 keys per vector, a half sub-block at a time. Stored + 128, the keys would
  // saturate vpmaddubsw's int16 pairs, so they are made signed again (never -128: the cache
  // clamps to +-127) and the query's sign moves onto them, |q| * (k * sign(q)) (w4a8.cpp's
  // int8 tile): t is the VNNI loop's integer, then its float operations.
  if constexpr (DC > 0) {
    const __m256i flip = _mm256_set1_epi8(char(0x80)), ones = _mm256_set1_epi16(1);
    alignas(32) float res[GC][kv8::SUB];
    for (int half = 0; half < 2; ++half) {
      __m256 acc[GC];
      for (int h = 0; h < GC; ++h) acc[h] = _mm256_setzero_ps();
      for (int c = 0; c < DC / kv8::GRP; ++c) {
        const int8_t* kc = sb + 512 * c + 32 * half;
        __m256i t[GC];
        for (int h = 0; h < GC; ++h) t[h] = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
          const __m256i k = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kc + 64 * j)), flip);
          for (int h = 0; h < GC; ++h) {
            const __m256i qb = _mm256_set1_epi32(quad(q8 + h * D + kv8::GRP * c + 4 * j));
            t[h] = _mm256_add_epi32(
                t[h], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(qb),
                                                             _mm256_sign_epi8(k, qb)), ones));
          }
        }
        const __m256 kd = _mm256_loadu_ps(ks + kv8::SUB * c + 8 * half);
        for (int h = 0; h < GC; ++h)
          acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[h]),
                                   _mm256_mul_ps(kd, _mm256_set1_ps(qd[h * NG + c])), acc[h]);
      }
      for (int h = 0; h < GC; ++h) _mm256_store_ps(res[h] + 8 * half, acc[h]);
    }
    for (int h = 0; h < GC; ++h)
      for (int64_t u = j_lo; u < j_hi; ++u) out[h * stride + u] = res[h][u];
    return;
  }
#endif
  for (int h = 0; h < GC; ++h)
    for (int64_t u = j_lo; u < j_hi; ++u) {
      float acc = 0.f;
      for (int64_t c = 0; c < D / kv8::GRP; ++c) {
        int32_t t = corr[h * NG + c];
        for (int64_t i = 0; i < kv8::GRP; ++i) {
          const int64_t dim = kv8::GRP * c + i;
          t += int32_t(uint8_t(sb[dim / 4 * 64 + u * 4 + dim % 4])) * q8[h * D + dim];
        }
        acc = std::fma(float(t), ks[kv8::SUB * c + u] * qd[h * NG + c], acc);
      }
      out[h * stride + u] = acc;
    }
}

// scores() for the int8 cache: GMAX heads at a time (the registers hold 2 * GMAX chains).
template <typename T, int64_t DC>
[[gnu::always_inline]]
inline void scores_int8(const T* q, const Item<int8_t>& it, int64_t bs, int64_t D, int64_t G,
                        float scale, float* sc, int64_t stride, Q8& q8, Prefetch<int8_t>& pf) {
  constexpr int GMAX = 4;
  const int64_t start = it.start, end = it.end, NG = D / kv8::GRP;
  quantize_query(q, D, G, q8);
  for (int64_t p0 = start - start % kv8::SUB; p0 < end; p0 += kv8::SUB) {
    if (p0 % bs == 0 || p0 <= start) pf.step(false);  // a block at a time
    const int8_t* sb = it.kh + kv8::sub_offset(it.table, p0, bs, D);
    const int64_t lo = std::max(p0, start) - p0, hi = std::min(p0 + kv8::SUB, end) - p0;
    for (int64_t g = 0; g < G; g += GMAX) {
      const int8_t* qg = q8.q + g * D;
      const float* dg = q8.d + g * NG;
      const int32_t* cg = q8.corr + g * NG;
      float* og = sc + g * stride + (p0 - start);
      switch (std::min<int64_t>(GMAX, G - g)) {
        case 1: qk_sub_int8<DC, 1>(qg, dg, cg, NG, sb, D, lo, hi, og, stride); break;
        case 2: qk_sub_int8<DC, 2>(qg, dg, cg, NG, sb, D, lo, hi, og, stride); break;
        case 3: qk_sub_int8<DC, 3>(qg, dg, cg, NG, sb, D, lo, hi, og, stride); break;
        default: qk_sub_int8<DC, GMAX>(qg, dg, cg, NG, sb, D, lo, hi, og, stride);
      }
    }
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
[[gnu::always_inline]]
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

#if defined(__AVX2__) && defined(__FMA__) && !(defined(__AVX512F__) && defined(__AVX512BW__))
// pv_int8 on AVX2 (16 vector registers): one group of 32 dims (c) for GC <= 3 heads per
// pass, 4 accumulators a head. Each key's V values are widened once per pass; the float
// operations per output are pv_int8's, in key order: the same bits.
template <int GC>
[[gnu::always_inline]]
inline void pv_int8_avx2(const Item<int8_t>& it, int64_t bs, int64_t DC, int64_t c,
                         const float* w, int64_t stride, float* acc, Prefetch<int8_t>* pf) {
  __m256 a[GC][4];
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < 4; ++j) a[g][j] = _mm256_setzero_ps();
  for (int64_t p0 = it.start - it.start % kv8::SUB; p0 < it.end; p0 += kv8::SUB) {
    if (pf && (p0 % bs == 0 || p0 <= it.start)) pf->step(true);
    const int8_t* sb = it.vh + kv8::sub_offset(it.table, p0, bs, DC);
    const float* vs = reinterpret_cast<const float*>(sb + kv8::SUB * DC) + kv8::SUB * c;
    const int64_t lo = std::max(p0, it.start) - p0, hi = std::min(p0 + kv8::SUB, it.end) - p0;
    for (int64_t u = lo; u < hi; ++u) {
      const int8_t* vrow = sb + u * DC + kv8::GRP * c;
      __m256 ws[GC];
      for (int g = 0; g < GC; ++g)
        ws[g] = _mm256_set1_ps(w[g * stride + (p0 + u - it.start)] * vs[u]);
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vrow + 8 * j))));
        for (int g = 0; g < GC; ++g) a[g][j] = _mm256_fmadd_ps(ws[g], v, a[g][j]);
      }
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(acc + g * DC + kv8::GRP * c + 8 * j, a[g][j]);
}
#endif

template <int64_t DC>
[[gnu::always_inline]]
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
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (DC > 0) {
    for (int64_t c = 0; c < DC / kv8::GRP; ++c)
      for (int64_t g = 0; g < G; g += 3) {
        Prefetch<int8_t>* p = c == 0 && g == 0 ? &pf : nullptr;  // the next item's V
        const float* wg = w + g * stride;
        float* ag = acc + g * DC;
        switch (std::min<int64_t>(3, G - g)) {
          case 1: pv_int8_avx2<1>(it, bs, DC, c, wg, stride, ag, p); break;
          case 2: pv_int8_avx2<2>(it, bs, DC, c, wg, stride, ag, p); break;
          default: pv_int8_avx2<3>(it, bs, DC, c, wg, stride, ag, p);
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

}  // namespace tmk::attn
