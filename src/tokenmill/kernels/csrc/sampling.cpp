// Sampling-side reductions for the CPU. Part of the library kernels/cpu.py builds from csrc/.
#include <omp.h>

#include "tm_kernels.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>

namespace {

using tmk::load;

// The index of the first largest of x[0:n]: torch.argmax's answer on any row without NaN
// (NaN compares false here, so it is skipped; torch would return its index).
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t i = 0, best_i = 0;
  float best = -INFINITY;
#if defined(__AVX512F__)
  // 16 lanes, each keeping its first largest (strictly greater replaces); then the largest
  // value over lanes, and the smallest index holding it.
  if (n >= 16) {
    __m512 vbest = _mm512_set1_ps(-INFINITY);
    __m512i vidx = _mm512_setzero_si512(), cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                   10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; i + 16 <= n; i += 16) {
      __m512 v;
      if constexpr (sizeof(T) == 2)
        v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))),
            16));
      else
        v = _mm512_loadu_ps(reinterpret_cast<const float*>(x + i));
      const __mmask16 gt = _mm512_cmp_ps_mask(v, vbest, _CMP_GT_OQ);
      vbest = _mm512_mask_mov_ps(vbest, gt, v);
      vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
      cur = _mm512_add_epi32(cur, step);
    }
    best = _mm512_reduce_max_ps(vbest);
    if (best > -INFINITY) {
      const __mmask16 at = _mm512_cmp_ps_mask(vbest, _mm512_set1_ps(best), _CMP_EQ_OQ);
      best_i = _mm512_mask_reduce_min_epi32(at, vidx);
    } else {
      i = 0;  // nothing above -inf so far: the plain loop below finds the first -inf
    }
  }
#elif defined(__AVX2__)
  // The same with 8 lanes (blends for the masked moves).
  if (n >= 8) {
    __m256 vbest = _mm256_set1_ps(-INFINITY);
    __m256i vidx = _mm256_setzero_si256(), cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i step = _mm256_set1_epi32(8);
    for (; i + 8 <= n; i += 8) {
      const __m256 v = tmk::load8(x + i);
      const __m256 gt = _mm256_cmp_ps(v, vbest, _CMP_GT_OQ);
      vbest = _mm256_blendv_ps(vbest, v, gt);
      vidx = _mm256_blendv_epi8(vidx, cur, _mm256_castps_si256(gt));
      cur = _mm256_add_epi32(cur, step);
    }
    alignas(32) float bv[8];
    alignas(32) int32_t bi[8];
    _mm256_store_ps(bv, vbest);
    _mm256_store_si256(reinterpret_cast<__m256i*>(bi), vidx);
    for (int l = 0; l < 8; ++l) best = bv[l] > best ? bv[l] : best;
    if (best > -INFINITY) {
      best_i = n;
      for (int l = 0; l < 8; ++l)
        if (bv[l] == best && bi[l] < best_i) best_i = bi[l];
    } else {
      i = 0;
    }
  }
#endif
  bool found = best > -INFINITY;
  for (; i < n; ++i) {
    const float v = load(x, i);
    if (v > best || (!found && v == best)) {
      best = v;
      best_i = i;
      found = true;
    }
  }
  return best_i;
}

}  // namespace

extern "C" {

#define TM_ARGMAX(NAME, T)                                                                  \
  void NAME(const T* x, int64_t stride, int64_t rows, int64_t n, int64_t* out, int threads) { \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows > 1)")          \
    for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * stride, n);              \
  }
TM_ARGMAX(tm_argmax_bf16, uint16_t)
TM_ARGMAX(tm_argmax_f32, float)

}  // extern "C"
