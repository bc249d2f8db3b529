// The w4a8 and w8a8 tiles on AVX2 without VNNI (AMD Zen 2/3, Intel before Ice Lake):
// vpmaddubsw + vpmaddwd make the exact integer sums of the VNNI loop's vpdpbusd, then its
// float operations: the same bits. Included by w4a8.cpp only (its tile_rows / tile_rows8).
#pragma once
#include "w4a8.h"

#if TM_W4A8_AVX2
namespace tmk::w4a8 {

// Keeps v in a register as it is: GCC otherwise reassociates a row's chain of int16 sums,
// computes all 8 products of the group first and spills them (the loop ran at a third of
// the speed).
[[gnu::always_inline]] inline void pin(__m256i& v) { asm("" : "+x"(v)); }

// 8 floats to float or bfloat16 storage.
template <typename T>
inline void store8(T* y, __m256 v) {
  alignas(32) float out[8];
  _mm256_store_ps(out, v);
  for (int r = 0; r < 8; ++r) from_float(y + r, out[r]);
}

// The int4 tile on AVX2: a vector holds 8 output rows (the low or the high 32 bytes of the
// packed vectors), and both halves share each activation broadcast. Per group, row and half,
// 8 vpmaddubsw (unsigned q times signed a8, adjacent pairs summed to int16) add up in int16:
// at most 8 * 2 * 15 * 127 = 30480, so nothing saturates or wraps; one vpmaddwd then gives
// each output row's int32 sum over the group. That is the integer t of the VNNI loop,
// followed by its float operations: the same bits. 2 rows a pass (MB) fill the 16 registers.
template <typename T, int NR>
inline void tile_rows_avx2(const uint8_t* w, const uint16_t* sz, int64_t G, const int8_t* xq,
                           const Act* act, int64_t K, T* y, int64_t y_stride, const char* nw,
                           const char* ns) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i top = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  __m256 acc[NR][2];
  for (int m = 0; m < NR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * WB;
    prefetch_group<WB>(nw, ns, g);
    __m256i p[NR][2];
    for (int m = 0; m < NR; ++m) p[m][0] = p[m][1] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * j));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * j + 32));
      const __m256i lo0 = _mm256_and_si256(v0, nib), lo1 = _mm256_and_si256(v1, nib);
      const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), nib);
      const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), nib);
      for (int m = 0; m < NR; ++m) {
        const int8_t* a = xq + m * K + g * GS;
        const __m256i bl = _mm256_set1_epi32(quad(a + 4 * j));
        const __m256i bh = _mm256_set1_epi32(quad(a + 16 + 4 * j));
        p[m][0] = _mm256_add_epi16(p[m][0], _mm256_maddubs_epi16(lo0, bl));
        p[m][1] = _mm256_add_epi16(p[m][1], _mm256_maddubs_epi16(lo1, bl));
        p[m][0] = _mm256_add_epi16(p[m][0], _mm256_maddubs_epi16(hi0, bh));
        p[m][1] = _mm256_add_epi16(p[m][1], _mm256_maddubs_epi16(hi1, bh));
        pin(p[m][0]);
        pin(p[m][1]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i sc =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + g * 2 * TN + 16 * h));
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(sc, 16));
      const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(sc, top));
      for (int m = 0; m < NR; ++m) {
        const Act& pa = act[m * G + g];
        const __m256i t =
            _mm256_add_epi32(_mm256_set1_epi32(pa.corr), _mm256_madd_epi16(p[m][h], ones));
        const __m256 f = _mm256_cvtepi32_ps(t);
        acc[m][h] = _mm256_fmadd_ps(f, _mm256_mul_ps(s, _mm256_set1_ps(pa.d)), acc[m][h]);
        acc[m][h] = _mm256_fmadd_ps(z, _mm256_set1_ps(pa.dsum), acc[m][h]);
      }
    }
  }
  for (int m = 0; m < NR; ++m) {
    store8(y + m * y_stride, acc[m][0]);
    store8(y + m * y_stride + 8, acc[m][1]);
  }
}

// The int8 tile on AVX2. q + 128 times a8 would saturate vpmaddubsw's int16 pairs, so the
// weights are made signed again (q in -127..127, never -128: W8A8Weight clamps) and a8's
// sign moves onto them: |a8| * (q * sign(a8)), pairs at most 2 * 127 * 127 = 32258, widened
// to int32 at once. The sum is t of the VNNI loop (whose + 128 its correction takes off).
// Both 8-row halves share each broadcast and its |a8|.
template <typename T, int NR>
inline void tile_rows8_avx2(const uint8_t* w, const float* dw, int64_t G, const int8_t* xq,
                            const Act* act, int64_t K, T* y, int64_t y_stride, const char* nw,
                            const char* ns) {
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NR][2];
  for (int m = 0; m < NR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * WB8;
    prefetch_group<WB8>(nw, ns, g);
    __m256i t[NR][2];
    for (int m = 0; m < NR; ++m) t[m][0] = t[m][1] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i q0 = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * c)), flip);
      const __m256i q1 = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * c + 32)), flip);
      for (int m = 0; m < NR; ++m) {
        const __m256i a = _mm256_set1_epi32(quad(xq + m * K + g * GS + 4 * c));
        const __m256i aa = _mm256_abs_epi8(a);
        t[m][0] = _mm256_add_epi32(
            t[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(aa, _mm256_sign_epi8(q0, a)), ones));
        t[m][1] = _mm256_add_epi32(
            t[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(aa, _mm256_sign_epi8(q1, a)), ones));
        pin(t[m][0]);
        pin(t[m][1]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_loadu_ps(dw + g * TN + 8 * h);
      for (int m = 0; m < NR; ++m) {
        const __m256 f = _mm256_cvtepi32_ps(t[m][h]);
        acc[m][h] =
            _mm256_fmadd_ps(f, _mm256_mul_ps(d, _mm256_set1_ps(act[m * G + g].d)), acc[m][h]);
      }
    }
  }
  for (int m = 0; m < NR; ++m) {
    store8(y + m * y_stride, acc[m][0]);
    store8(y + m * y_stride + 8, acc[m][1]);
  }
}

}  // namespace tmk::w4a8
#endif  // TM_W4A8_AVX2
