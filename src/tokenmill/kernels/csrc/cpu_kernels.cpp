// tokenmill's CPU kernels, compiled on first use by tokenmill/kernels/cpu.py
// (g++ -O3 -march=native -fopenmp -shared) and called through ctypes with raw pointers.
//
// Batch invariance: token rows are processed in blocks of up to RB rows, and every row of a
// block runs the same vector loop with its own accumulators (the block size only decides how
// many such accumulators a loop carries), so a row's result does not depend on which other
// requests share the step. tests/kernels/test_cpu_kernels.py checks this bit for bit.
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

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return tm::bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = tm::float_to_bf16(v); }

// exp(x) for the softmax, in plain arithmetic so that `omp simd` vectorizes it (glibc's
// vector expf needs -ffast-math): 2^n * e^r with r = x - n ln2 in [-ln2/2, ln2/2] (ln2 split
// in two for accuracy) and a degree-6 Taylor polynomial; relative error < 2e-7 for x in
// [-87, 0], the softmax's range. Below -87 the result is 0 (float32's exp would be < 1.7e-38).
inline float exp_neg(float x) {
  const float xc = x < -87.f ? -87.f : x;
  // rint (the current rounding, to nearest even) inlines as one instruction; roundf
  // (ties away from zero) was a libm call per element, which kept the loop scalar.
  const float n = __builtin_rintf(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits;
  bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return x < -87.f ? 0.f : p * two_n;
}

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

// Round a float to T's precision (bfloat16: nearest even), as a torch op producing T does.
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) {
  uint16_t b;
  store(&b, 0, v);
  return load(&b, 0);
}

// act[m] = silu(gate[m]) * up[m] for rows gu[m] = [gate (I) | up (I)], with torch's roundings
// (`F.silu(gate) * up`): silu(x) = x * sigmoid(x) in float32, rounded to T, then the product
// rounded. sigmoid from exp_neg of -|x| (no overflow): 1 / (1 + e) or e / (1 + e).
template <typename T>
void silu_mul(const T* gu, T* act, int64_t M, int64_t I, int threads) {
  constexpr int64_t CH = 512;  // columns per work item
  const int64_t per_row = (I + CH - 1) / CH;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * I >= 16384)
  for (int64_t item = 0; item < M * per_row; ++item) {
    const int64_t m = item / per_row, lo = item % per_row * CH, hi = std::min(I, lo + CH);
    const T* g = gu + m * 2 * I;
    const T* u = g + I;
    T* a = act + m * I;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const float x = load(g, i);
      const float e = exp_neg(x < 0.f ? x : -x);
      const float sig = (x < 0.f ? e : 1.f) / (1.f + e);
      const float silu = round_to(x * sig, g);
      store(a, i, silu * load(u, i));
    }
  }
}


// Pre-norm residual add + RMSNorm over rows of H, with the arithmetic of the torch module it
// replaces (layers/norm.py, itself transformers'): r = x + residual rounded to T; the mean of
// squares in float32; x_hat = r * rsqrt(ms + eps) rounded to T; out = weight * x_hat rounded.
// residual may be null (the first layer: r = x). r_out receives r; out the normalized rows.
template <typename T>
void add_rmsnorm(const T* x, int64_t x_stride, const T* residual, T* r_out, const T* weight,
                 T* out, int64_t rows, int64_t H, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
  for (int64_t t = 0; t < rows; ++t) {
    const T* xr = x + t * x_stride;
    T* rr = r_out + t * H;
    float ss = 0.f;
    if (residual) {
      const T* res = residual + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) store(rr, i, load(xr, i) + load(res, i));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) store(rr, i, load(xr, i));
    }
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += load(rr, i) * load(rr, i);
    const float inv = 1.f / std::sqrt(ss / float(H) + eps);
    T* o = out + t * H;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i)
      store(o, i, load(weight, i) * round_to(load(rr, i) * inv, rr));
  }
}

// Rotary embedding (transformers' rotate-half form) of q and k in place, then k and v written
// into the paged cache. qkv [T, (Hq + 2 Hk) * D] rows (stride qkv_stride); cos/sin [positions,
// D] tables of T's dtype; caches [Hk, n_blocks * bs, D] (head stride kv_head); slots [T].
// The arithmetic is torch's: x * cos and rotate_half(x) * sin each rounded to T, then their
// sum rounded; no fused multiply-add (fp-contract is off for this function), so float32 too
// gives torch's bits.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
void rope_kv(T* qkv, int64_t qkv_stride, int64_t rows, int64_t Hq, int64_t Hk, int64_t D,
             const int64_t* positions, const T* cos, const T* sin, T* kc, T* vc,
             int64_t kv_head, const int64_t* slots, int threads) {
  const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
  for (int64_t t = 0; t < rows; ++t) {
    T* row = qkv + t * qkv_stride;
    const T* c = cos + positions[t] * D;
    const T* s = sin + positions[t] * D;
    for (int64_t h = 0; h < Hq + Hk; ++h) {
      T* x = row + h * D;
      float lo[512], hi[512];  // D <= 1024, checked by the caller
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = load(x, i), x2 = load(x, i + half);
        const float a = round_to(x1 * load(c, i), x), b = round_to(-x2 * load(s, i), x);
        const float e = round_to(x2 * load(c, i + half), x);
        const float f = round_to(x1 * load(s, i + half), x);
        lo[i] = a + b;
        hi[i] = e + f;
      }
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        store(x, i, lo[i]);
        store(x, i + half, hi[i]);
      }
    }
    const int64_t slot = slots[t];
    for (int64_t h = 0; h < Hk; ++h) {
      std::memcpy(kc + h * kv_head + slot * D, row + (Hq + h) * D, D * sizeof(T));
      std::memcpy(vc + h * kv_head + slot * D, row + (Hq + Hk + h) * D, D * sizeof(T));
    }
  }
}
#pragma GCC pop_options

}  // namespace

extern "C" {

int tm_abi_version() { return 12; }

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

#define TM_ADD_RMSNORM(NAME, T)                                                               \
  void NAME(const T* x, int64_t x_stride, const T* residual, T* r_out, const T* weight,       \
            T* out, int64_t rows, int64_t H, float eps, int threads) {                        \
    add_rmsnorm(x, x_stride, residual, r_out, weight, out, rows, H, eps, threads);            \
  }
TM_ADD_RMSNORM(tm_add_rmsnorm_bf16, uint16_t)
TM_ADD_RMSNORM(tm_add_rmsnorm_f32, float)

#define TM_SILU_MUL(NAME, T) \
  void NAME(const T* gu, T* act, int64_t M, int64_t I, int threads) { silu_mul(gu, act, M, I, threads); }
TM_SILU_MUL(tm_silu_mul_bf16, uint16_t)
TM_SILU_MUL(tm_silu_mul_f32, float)

// Returns the index of the first position outside [0, n_positions) (nothing is written
// then), or -1 when all are inside: the caller raises, as indexing the table in torch would.
#define TM_ROPE_KV(NAME, T)                                                                   \
  int64_t NAME(T* qkv, int64_t qkv_stride, int64_t rows, int64_t Hq, int64_t Hk, int64_t D,   \
               const int64_t* positions, int64_t n_positions, const T* cos, const T* sin,     \
               T* kc, T* vc, int64_t kv_head, const int64_t* slots, int threads) {            \
    for (int64_t t = 0; t < rows; ++t)                                                        \
      if (positions[t] < 0 || positions[t] >= n_positions) return t;                          \
    rope_kv(qkv, qkv_stride, rows, Hq, Hk, D, positions, cos, sin, kc, vc, kv_head, slots,    \
            threads);                                                                         \
    return -1;                                                                                \
  }
TM_ROPE_KV(tm_rope_kv_bf16, uint16_t)
TM_ROPE_KV(tm_rope_kv_f32, float)

}  // extern "C"
