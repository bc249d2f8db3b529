// LoRA SGMV for the CPU: every row's y += B_s (A_s x) for the adapter slot s of its segment.
// Compiled on first use by tokenmill/kernels/cpu.py (g++ -O3 -march=native -fopenmp -shared)
// with the other csrc files into one library, called through ctypes with raw pointers.
//
// Batch invariance: token rows are processed in blocks of up to RB rows, and every row of a
// block runs the same vector loop with its own accumulators (the block size only decides how
// many such accumulators a loop carries), so a row's result does not depend on which other
// requests share the step. tests/kernels/test_cpu_kernels.py checks this bit for bit.
#include <omp.h>

#include "tm_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using tmk::exp_neg;
using tmk::load;
using tmk::round_to;
using tmk::store;

constexpr int64_t RB = 4;   // token rows per block
constexpr int64_t OC = 64;  // output columns per expand work item

// acc[j][o] = sum over r in [r_lo, r_hi) of h[j][r] * B[r][o] for NR token rows and o < w,
// B's rows `out` apart (W: the width known at compile time, so the accumulators can stay in
// registers; 0: w). Both LoRA factors are this loop: the shrink with B = A^T and h = x, the
// expand with B^T and h = x A^T; broadcasts and FMAs only, no horizontal sums.
template <typename T, int NR, int64_t W>
inline void expand_block(const T* b, int64_t out, int64_t r_lo, int64_t r_hi,
                         const float* const* h, float (&acc)[RB][OC], int64_t w) {
  const int64_t n = W ? W : w;
  // Local accumulators (acc is written once at the end): with W fixed they live in registers;
  // accumulating into `acc` directly made the compiler store them back every iteration.
  float loc[NR][W ? W : OC];
  for (int j = 0; j < NR; ++j)
    for (int64_t o = 0; o < n; ++o) loc[j][o] = 0.f;
  for (int64_t r = r_lo; r < r_hi; ++r) {
    const T* brow = b + r * out;
    const float c0 = h[0][r];
    const float c1 = h[NR > 1 ? 1 : 0][r], c2 = h[NR > 2 ? 2 : 0][r], c3 = h[NR > 3 ? 3 : 0][r];
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) {
      const float bv = load(brow, o);
      loc[0][o] += c0 * bv;
      if constexpr (NR > 1) loc[1][o] += c1 * bv;
      if constexpr (NR > 2) loc[2][o] += c2 * bv;
      if constexpr (NR > 3) loc[3][o] += c3 * bv;
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int64_t o = 0; o < n; ++o) acc[j][o] = loc[j][o];
}

template <typename T, int NR>
inline void tile_nr(const T* b, int64_t out, int64_t r_lo, int64_t r_hi, const float* const* h,
                    float (&acc)[RB][OC], int64_t w) {
  switch (w) {  // the common widths (ranks 16-64 and full column blocks) get fixed trip counts
    case 16: expand_block<T, NR, 16>(b, out, r_lo, r_hi, h, acc, w); break;
    case 32: expand_block<T, NR, 32>(b, out, r_lo, r_hi, h, acc, w); break;
    case 48: expand_block<T, NR, 48>(b, out, r_lo, r_hi, h, acc, w); break;
    case 64: expand_block<T, NR, 64>(b, out, r_lo, r_hi, h, acc, w); break;
    default: expand_block<T, NR, 0>(b, out, r_lo, r_hi, h, acc, w);
  }
}

template <typename T>
inline void tile(int64_t nr, const T* b, int64_t out, int64_t r_lo, int64_t r_hi,
                 const float* const* h, float (&acc)[RB][OC], int64_t w) {
  switch (nr) {
    case 1: tile_nr<T, 1>(b, out, r_lo, r_hi, h, acc, w); break;
    case 2: tile_nr<T, 2>(b, out, r_lo, r_hi, h, acc, w); break;
    case 3: tile_nr<T, 3>(b, out, r_lo, r_hi, h, acc, w); break;
    default: tile_nr<T, 4>(b, out, r_lo, r_hi, h, acc, w);
  }
}

// y[rows[j]] += B_s @ (A_s @ x[rows[j]]) for the rows of each segment g (slot seg_slot[g],
// rows[seg[g]:seg[g+1]]). a: A^T [S, in, R] (slot stride a_slot), bt: B^T [S, R, out] (slot
// stride b_slot), the scale folded into B. Scratch: xf [n_rows, in], h [n_rows, R] floats.
// chunks [n_chunks, 4] = (first column, width <= OC, r_lo, r_hi) cover the output columns; a
// fused linear's B is block-diagonal (q/k/v or gate/up each own R / n_shards ranks), so each
// column block reads only its shard's rank rows and skips the zeros.
template <typename T>
void lora_sgmv(const T* x, int64_t x_stride, T* y, int64_t y_stride, const T* a, int64_t a_slot,
               const T* bt, int64_t b_slot, const int64_t* rows, const int64_t* seg,
               const int64_t* seg_slot, int64_t n_groups, int64_t R, int64_t in, int64_t out,
               const int64_t* chunks, int64_t n_chunks, float* xf, float* h, int threads) {
  const int64_t n_rows = seg[n_groups];
  int64_t max_blocks = 0;
  for (int64_t g = 0; g < n_groups; ++g)
    max_blocks = std::max(max_blocks, (seg[g + 1] - seg[g] + RB - 1) / RB);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n_rows; ++j) {
      const T* src = x + rows[j] * x_stride;
      float* dst = xf + j * in;
#pragma omp simd
      for (int64_t k = 0; k < in; ++k) dst[k] = load(src, k);
    }
    // shrink: one work item per (segment, block of RB token rows): h = x A^T, OC ranks at a time
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_groups * max_blocks; ++item) {
      const int64_t g = item / max_blocks, j0 = seg[g] + (item % max_blocks) * RB;
      if (j0 >= seg[g + 1]) continue;
      const int64_t nr = std::min(RB, seg[g + 1] - j0);
      const float* p[RB];
      for (int64_t j = 0; j < nr; ++j) p[j] = xf + (j0 + j) * in;
      const T* at = a + seg_slot[g] * a_slot;
      for (int64_t r0 = 0; r0 < R; r0 += OC) {
        const int64_t w = std::min(OC, R - r0);
        float acc[RB][OC];
        tile(nr, at + r0, R, 0, in, p, acc, w);
        for (int64_t j = 0; j < nr; ++j)
          for (int64_t r = 0; r < w; ++r) h[(j0 + j) * R + r0 + r] = acc[j][r];
      }
    }
    // expand: one work item per (segment, column chunk); B's rows are read once per block
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_groups * n_chunks; ++item) {
      const int64_t g = item / n_chunks, *c = chunks + (item % n_chunks) * 4;
      const int64_t o0 = c[0], w = c[1], r_lo = c[2], r_hi = c[3];
      const T* bslot = bt + seg_slot[g] * b_slot + o0;
      for (int64_t j0 = seg[g]; j0 < seg[g + 1]; j0 += RB) {
        const int64_t nr = std::min(RB, seg[g + 1] - j0);
        const float* hr[RB];
        for (int64_t j = 0; j < nr; ++j) hr[j] = h + (j0 + j) * R;
        float acc[RB][OC];
        tile(nr, bslot, out, r_lo, r_hi, hr, acc, w);
        for (int64_t j = 0; j < nr; ++j) {
          const int64_t base = rows[j0 + j] * y_stride + o0;
#pragma omp simd
          for (int64_t o = 0; o < w; ++o) store(y, base + o, load(y, base + o) + acc[j][o]);
        }
      }
    }
  }
}

}  // namespace

extern "C" {

int tm_abi_version() { return 19; }

#define TM_LORA_SGMV(NAME, T)                                                                 \
  void NAME(const T* x, int64_t x_stride, T* y, int64_t y_stride, const T* a, int64_t a_slot, \
            const T* bt, int64_t b_slot, const int64_t* rows, const int64_t* seg,             \
            const int64_t* seg_slot, int64_t n_groups, int64_t R, int64_t in, int64_t out,    \
            const int64_t* chunks, int64_t n_chunks, float* xf, float* h, int threads) {      \
    lora_sgmv(x, x_stride, y, y_stride, a, a_slot, bt, b_slot, rows, seg, seg_slot, n_groups, \
              R, in, out, chunks, n_chunks, xf, h, threads);                                  \
  }
TM_LORA_SGMV(tm_lora_sgmv_bf16, uint16_t)
TM_LORA_SGMV(tm_lora_sgmv_f32, float)

}  // extern "C"
