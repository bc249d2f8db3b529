// int4 weights x int8 activations (`--quantize w4a8`): the arithmetic of llama.cpp's
// Q4_1 x Q8_1 dot products, built by tokenmill/kernels/cpu.py into the same library as
// the other csrc files.
//
// Weights: groups of 32 along K, w = (q - 8) * s + z with q in 0..15 and s, z bfloat16
// (layers/quant.py). Activations: each row's groups of 32 are quantized on the fly to
// a = d * a8 with d = max|x| / 127 and a8 = round-half-even(x * (1 / d)) in -127..127. Then
//   sum_k w_k a_k = d * (s * (sum_k q_k a8_k - 8 * sum_k a8_k) + z * sum_k a8_k)
// and the integer sums are exact: AVX-512 VNNI's vpdpbusd multiplies 64 unsigned q by 64 signed
// a8 per instruction, 4x the products of a bfloat16 dot product, from half-byte weights that
// need only a mask and a shift to unpack.
//
// Packed layout (W4A8Weight.pack): tiles of 16 output rows; per tile and group 256 bytes,
// 4 vectors of 64 = [row r][4 consecutive k] bytes, vector j holding k-quad j of the group in
// its low nibbles and quad j + 4 in its high ones; then the scales as [tile][group][row](s, z)
// bfloat16 pairs, 64 bytes per tile and group.
//
// int8 weights (`W8A8Weight`, the LM head of a w4a8 model, GGUF's Q8_0 arithmetic): w = d * q
// with q in -127..127 per group of 32 and d float32; stored as q + 128 (unsigned, for
// vpdpbusd) in 8 vectors of 64 = [row r][4 consecutive k] bytes per tile and group, vector c
// holding k-quad c; the scales [tile][group][row] float32.
//
// Every output row is computed by the same sequence of float operations whatever the other
// rows are (batch invariance), and the AVX2 path (no VNNI) and the scalar one (neither)
// perform the same operations as the VNNI one, so all give the same bits.
#include <omp.h>

#include "tm_kernels.h"
#include "w4a8.h"
#include "w4a8_amx.h"
#include "w4a8_avx2.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace tmk::w4a8;

// Activation rows per pass over a tile's weights: AVX2 has 16 vector registers, not 32.
#if TM_W4A8_AVX2
constexpr int64_t MB = 2;
#else
constexpr int64_t MB = 8;
#endif
constexpr int64_t GLU_ROWS = 4;     // rows from which the gate/up matmul takes the SiLU epilogue
constexpr int64_t GUIDED_ROWS = 32; // rows per work item from which items are handed out guided

#if defined(__AVX512F__)
// One row's G groups, 16 at a time: their maxima, then their sums, reduced together
// (tmk::reduce16) rather than one horizontal reduction each, whose latency chains made
// quantizing ~4% of a decode step. The float operations of tmk::quantize_group, so the same
// bits; the sums are of integers, exact in float.
template <typename T>
void quantize_row(const T* x, int64_t G, int8_t* xq, Act* act) {
  const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  for (int64_t g0 = 0; g0 < G; g0 += 16) {
    const int n = int(std::min<int64_t>(16, G - g0));
    const T* src = x + g0 * GS;
    __m512 v[16];
    for (int j = 0; j < 16; ++j)
      v[j] = j < n ? _mm512_max_ps(_mm512_abs_ps(tmk::load16(src + j * GS)),
                                   _mm512_abs_ps(tmk::load16(src + j * GS + 16)))
                   : _mm512_setzero_ps();
    const __m512 d = _mm512_div_ps(tmk::reduce16(v, tmk::vmax), _mm512_set1_ps(127.f));
    const __m512 id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GT_OQ),
                                          _mm512_set1_ps(1.f), d);
    alignas(64) float ds[16], ids[16], sums[16];
    _mm512_store_ps(ds, d);
    _mm512_store_ps(ids, id);
    for (int j = 0; j < 16; ++j) {
      v[j] = _mm512_setzero_ps();
      if (j >= n) continue;
      const __m512 s = _mm512_set1_ps(ids[j]);
      int8_t* q = xq + (g0 + j) * GS;
      const __m512i qa = _mm512_cvtps_epi32(
          _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(tmk::load16(src + j * GS), s), hi), lo));
      const __m512i qb = _mm512_cvtps_epi32(
          _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(tmk::load16(src + j * GS + 16), s), hi), lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
      v[j] = _mm512_cvtepi32_ps(_mm512_add_epi32(qa, qb));
    }
    _mm512_store_ps(sums, tmk::reduce16(v, tmk::vadd));
    for (int j = 0; j < n; ++j) set_act(act[g0 + j], ds[j], int32_t(sums[j]));
  }
}
#endif

template <typename T>
void quantize_rows(const T* x, int64_t x_stride, int64_t M, int64_t K, int8_t* xq, Act* act,
                   int threads) {
  const int64_t G = K / GS;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K >= 8192)
  for (int64_t m = 0; m < M; ++m) {
#if defined(__AVX512F__)
    quantize_row(x + m * x_stride, G, xq + m * K, act + m * G);
#else
    for (int64_t g = 0; g < G; ++g) {
      Act& a = act[m * G + g];
      float d;
      const int32_t sum = tmk::quantize_group(x + m * x_stride + g * GS, xq + m * K + g * GS, &d);
      set_act(a, d, sum);
    }
#endif
  }
}


// One tile (16 output rows) for NR activation rows: y[m][0:16] = x_m . W_tile. Per group the
// weights are unpacked once for all NR rows; each row then costs 8 vpdpbusd (in two chains)
// and 3 float operations, its broadcasts folded into memory operands.
template <typename T, int NR>
inline void tile_rows(const uint8_t* w, const uint16_t* sz, int64_t G, const int8_t* xq,
                      const Act* act, int64_t K, T* y, int64_t y_stride, const char* nw,
                      const char* ns) {
#if TM_W4A8_VNNI
  __m512 acc[NR];
  for (int m = 0; m < NR; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i top = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * WB;
    prefetch_group<WB>(nw, ns, g);
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(wg + 64 * j);
      lo[j] = _mm512_and_si512(v, nib);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    }
    const __m512i sc = _mm512_loadu_si512(sz + g * 2 * TN);  // (s, z) per row: one dword
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sc, 16));
    const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(sc, top));
    for (int m = 0; m < NR; ++m) {
      const int8_t* a = xq + m * K + g * GS;
      const Act& p = act[m * G + g];
      __m512i t0 = _mm512_set1_epi32(p.corr), t1 = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        t0 = _mm512_dpbusd_epi32(t0, lo[j], _mm512_set1_epi32(quad(a + 4 * j)));
        t1 = _mm512_dpbusd_epi32(t1, hi[j], _mm512_set1_epi32(quad(a + 16 + 4 * j)));
      }
      const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1));
      acc[m] = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(p.d)), acc[m]);
      acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(p.dsum), acc[m]);
    }
  }
  for (int m = 0; m < NR; ++m) {
    alignas(64) float out[TN];
    _mm512_store_ps(out, acc[m]);
    for (int64_t r = 0; r < TN; ++r) from_float(y + m * y_stride + r, out[r]);
  }
#elif TM_W4A8_AVX2
  tile_rows_avx2<T, NR>(w, sz, G, xq, act, K, y, y_stride, nw, ns);
#else
  float acc[NR][TN] = {};
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * WB;
    const uint16_t* sg = sz + g * 2 * TN;
    prefetch_group<WB>(nw, ns, g);
    for (int m = 0; m < NR; ++m) {
      const int8_t* a = xq + m * K + g * GS;
      const Act& p = act[m * G + g];
      for (int64_t r = 0; r < TN; ++r) {
        int32_t t = p.corr;
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) {
            const uint8_t b = wg[64 * j + 4 * r + i];
            t += int32_t(b & 0x0F) * a[4 * j + i] + int32_t(b >> 4) * a[4 * (j + 4) + i];
          }
        const float s = to_float(sg[2 * r]), z = to_float(sg[2 * r + 1]);
        acc[m][r] = std::fma(float(t), s * p.d, acc[m][r]);
        acc[m][r] = std::fma(z, p.dsum, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < NR; ++m)
    for (int64_t r = 0; r < TN; ++r) from_float(y + m * y_stride + r, acc[m][r]);
#endif
}

// The int8-weight tile: y[m][0:16] = x_m . W_tile with w = d * q; 8 vpdpbusd and 2 float
// operations per row and group, no unpacking.
template <typename T, int NR>
inline void tile_rows8(const uint8_t* w, const float* dw, int64_t G, const int8_t* xq,
                       const Act* act, int64_t K, T* y, int64_t y_stride, const char* nw,
                       const char* ns) {
#if TM_W4A8_VNNI
  __m512 acc[NR];
  for (int m = 0; m < NR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * WB8;
    prefetch_group<WB8>(nw, ns, g);
    __m512i q[8];
    for (int c = 0; c < 8; ++c) q[c] = _mm512_loadu_si512(wg + 64 * c);
    const __m512 d = _mm512_loadu_ps(dw + g * TN);
    for (int m = 0; m < NR; ++m) {
      const int8_t* a = xq + m * K + g * GS;
      const Act& p = act[m * G + g];
      __m512i t0 = _mm512_set1_epi32(p.corr8), t1 = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        t0 = _mm512_dpbusd_epi32(t0, q[c], _mm512_set1_epi32(quad(a + 4 * c)));
        t1 = _mm512_dpbusd_epi32(t1, q[c + 4], _mm512_set1_epi32(quad(a + 16 + 4 * c)));
      }
      const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1));
      acc[m] = _mm512_fmadd_ps(f, _mm512_mul_ps(d, _mm512_set1_ps(p.d)), acc[m]);
    }
  }
  for (int m = 0; m < NR; ++m) {
    alignas(64) float out[TN];
    _mm512_store_ps(out, acc[m]);
    for (int64_t r = 0; r < TN; ++r) from_float(y + m * y_stride + r, out[r]);
  }
#elif TM_W4A8_AVX2
  tile_rows8_avx2<T, NR>(w, dw, G, xq, act, K, y, y_stride, nw, ns);
#else
  float acc[NR][TN] = {};
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * WB8;
    prefetch_group<WB8>(nw, ns, g);
    for (int m = 0; m < NR; ++m) {
      const int8_t* a = xq + m * K + g * GS;
      const Act& p = act[m * G + g];
      for (int64_t r = 0; r < TN; ++r) {
        int32_t t = p.corr8;
        for (int c = 0; c < 8; ++c)
          for (int i = 0; i < 4; ++i) t += int32_t(wg[64 * c + 4 * r + i]) * a[4 * c + i];
        acc[m][r] = std::fma(float(t), dw[g * TN + r] * p.d, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < NR; ++m)
    for (int64_t r = 0; r < TN; ++r) from_float(y + m * y_stride + r, acc[m][r]);
#endif
}

// Both weight kinds: BITS 4 (scales: bfloat16 (s, z) pairs) or 8 (float32 d).
template <typename T, int BITS, int NR>
inline void tile(const uint8_t* w, const void* sc, int64_t G, const int8_t* xq, const Act* act,
                 int64_t K, T* y, int64_t y_stride, const char* nw, const char* ns) {
  if constexpr (BITS == 4)
    tile_rows<T, NR>(w, static_cast<const uint16_t*>(sc), G, xq, act, K, y, y_stride, nw, ns);
  else
    tile_rows8<T, NR>(w, static_cast<const float*>(sc), G, xq, act, K, y, y_stride, nw, ns);
}

// tile() for nr rows (up to MB): the instance for that count.
template <typename T, int BITS>
inline void tile_n(int64_t nr, const uint8_t* w, const void* sc, int64_t G, const int8_t* xq,
                   const Act* act, int64_t K, T* y, int64_t y_stride, const char* nw,
                   const char* ns) {
  switch (nr) {
    case 1: tile<T, BITS, 1>(w, sc, G, xq, act, K, y, y_stride, nw, ns); break;
    case 2: tile<T, BITS, 2>(w, sc, G, xq, act, K, y, y_stride, nw, ns); break;
    case 3: tile<T, BITS, 3>(w, sc, G, xq, act, K, y, y_stride, nw, ns); break;
    case 4: tile<T, BITS, 4>(w, sc, G, xq, act, K, y, y_stride, nw, ns); break;
    case 5: tile<T, BITS, 5>(w, sc, G, xq, act, K, y, y_stride, nw, ns); break;
    case 6: tile<T, BITS, 6>(w, sc, G, xq, act, K, y, y_stride, nw, ns); break;
    case 7: tile<T, BITS, 7>(w, sc, G, xq, act, K, y, y_stride, nw, ns); break;
    default: tile<T, BITS, MB>(w, sc, G, xq, act, K, y, y_stride, nw, ns);
  }
}

// y = x @ W^T, or with GLU (W = [gate | up], N = 2I, I a multiple of 16) y = silu(gate) *
// up [M, I]: the gate and up tiles of the same columns in one work item, their outputs
// rounded to T in a buffer and combined (tmk::silu_mul_row), the bits of the matmul followed
// by pointwise.cpp's SiLU · up without the [M, 2I] intermediate's pass over memory.
template <typename T, int BITS, bool GLU = false>
void quant_matmul(const T* x, int64_t x_stride, int64_t M, int64_t K, const uint8_t* w,
                  const void* sc, int64_t N, T* y, int64_t y_stride, int threads);

// A GLU computed in two steps: the full [M, N = 2I] product into a reused per-thread buffer,
// then SiLU · up row by row (pointwise.cpp's row function): the epilogue's bits.
template <typename T>
T* glu_buffer(int64_t M, int64_t N) {
  thread_local std::vector<T> gu;
  if (gu.size() < size_t(M * N)) gu.resize(size_t(M * N));
  return gu.data();
}
template <typename T>
void silu_mul_rows(const T* gu, int64_t M, int64_t N, T* y, int64_t y_stride, int threads) {
  const int64_t I = N / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * I >= 16384)
  for (int64_t m = 0; m < M; ++m)
    tmk::silu_mul_row(gu + m * N, gu + m * N + I, y + m * y_stride, I);
}

template <typename T, int BITS, bool GLU>
void quant_matmul(const T* x, int64_t x_stride, int64_t M, int64_t K, const uint8_t* w,
                  const void* sc, int64_t N, T* y, int64_t y_stride, int threads) {
  // Below GLU_ROWS rows the epilogue's alternation between a gate tile and an up tile (two
  // weight and two scale streams a thread) threw off the hardware's prefetch: the gate/up
  // stage of a batch-1 decode step took ~30% longer than the plain matmul's single streams
  // plus the SiLU pass (2026-12-03, before the software prefetch ran at every row count;
  // with it the two are even at 1-3 rows, so the two steps stay).
  if constexpr (GLU)
    if (M < GLU_ROWS) {
      T* gu = glu_buffer<T>(M, N);
      quant_matmul<T, BITS>(x, x_stride, M, K, w, sc, N, gu, N, threads);
      silu_mul_rows(gu, M, N, y, y_stride, threads);
      return;
    }
  const int64_t G = K / GS;
  // The quantized rows are shared by every thread; the buffers are reused across calls.
  // They only grow: resizing a vector up value-initializes the new part, a memset that cost
  // ~1% of a decode step while the layers' K alternated between the hidden and MLP sizes.
  // Rounded up to 16 rows: the tile path reads whole 16-row tiles.
  const int64_t Mp = (M + 15) / 16 * 16;
  thread_local std::vector<int8_t> q_buf;
  thread_local std::vector<Act> a_buf;
  if (q_buf.size() < size_t(Mp * K)) q_buf.resize(size_t(Mp * K));
  if (a_buf.size() < size_t(Mp * G)) a_buf.resize(size_t(Mp * G));
  int8_t* xq = q_buf.data();
  Act* act = a_buf.data();
  quantize_rows(x, x_stride, M, K, xq, act, threads);
#if TM_W4A8_AMX
  if (M >= amx_rows.load(std::memory_order_relaxed) && amx_permitted()) {
    if constexpr (GLU) {  // the tile path's full output, then SiLU · up
      T* gu = glu_buffer<T>(M, N);
      amx_matmul<T, BITS>(xq, act, M, K, w, sc, N, gu, N, threads);
      silu_mul_rows(gu, M, N, y, y_stride, threads);
    } else {
      amx_matmul<T, BITS>(xq, act, M, K, w, sc, N, y, y_stride, threads);
    }
    return;
  }
#endif
  // Work items: (chunk of MC rows, tile), tiles innermost, so a thread's items share a chunk,
  // whose int8 rows stay in cache while the tiles' weights stream past.
  constexpr int64_t tile_bytes = BITS == 4 ? WB : WB8;
  constexpr int64_t tile_scales = 4 * TN;  // bytes per tile and group: (s, z) bf16 or d f32
  // With GLU an item's tile t is the gate's, tile t + out_tiles the up projection's.
  const int64_t tiles = N / TN, out_tiles = GLU ? tiles / 2 : tiles;
  const int64_t chunks = (M + MC - 1) / MC;
  auto run_item = [&](int64_t item) {
    const int64_t t = item % out_tiles, c = item / out_tiles;
    const uint8_t* wt = w + t * G * tile_bytes;
    const void* st = static_cast<const char*>(sc) + t * G * tile_scales;
    // The next tile's weights and scales towards the L2 while this one computes, spread over
    // the first pass's groups (bunched at the item's start they filled the miss queues and
    // the loads waited for them: the time of the stream plus that of the compute). The LM
    // head's 28 MB stream from memory every step: 8, 16, 32 and 64 rows take it 1.15 ->
    // 0.95, 3.0 -> 1.9, 4.2 -> 3.2 and 6.7 -> 5.7 ms; decode steps of 4, 16, 32 and 64 rows
    // 4, 13, 7 and 3% less than with no prefetch below 32 rows and a bunched one above. With
    // 1-3 rows it once lost 2.5% to the hardware's stream prefetch alone; with the weights in
    // 2 MB pages (runner/weight_arena.py) decode steps of 1, 2 and 3 rows now gain 0-13%
    // (2026-12-03: 1-3.6%, 9-13%, 9%; with 4 KB pages 2.4% and 9%).
    const bool ahead = t + 1 < out_tiles;
    const char* nw = ahead ? reinterpret_cast<const char*>(wt + G * tile_bytes) : nullptr;
    const char* ns = ahead ? static_cast<const char*>(st) + G * tile_scales : nullptr;
    if constexpr (GLU) {
      // the up tile ahead while the gate computes, the next gate tile while the up does
      const uint8_t* wu = wt + out_tiles * G * tile_bytes;
      const void* su = static_cast<const char*>(st) + out_tiles * G * tile_scales;
      for (int64_t m0 = c * MC; m0 < std::min(M, c * MC + MC); m0 += MB) {
        const int64_t nr = std::min(MB, M - m0);
        const bool first = m0 == c * MC;
        alignas(64) T g[MB * TN], u[MB * TN];
        tile_n<T, BITS>(nr, wt, st, G, xq + m0 * K, act + m0 * G, K, g, TN,
                        first ? reinterpret_cast<const char*>(wu) : nullptr,
                        static_cast<const char*>(su));
        tile_n<T, BITS>(nr, wu, su, G, xq + m0 * K, act + m0 * G, K, u, TN,
                        first ? nw : nullptr, ns);
        for (int64_t r = 0; r < nr; ++r)
          tmk::silu_mul_row(g + r * TN, u + r * TN, y + (m0 + r) * y_stride + t * TN, TN);
      }
      return;
    }
    for (int64_t m0 = c * MC; m0 < std::min(M, c * MC + MC); m0 += MB) {
      const int8_t* q = xq + m0 * K;
      const Act* a = act + m0 * G;
      T* out = y + m0 * y_stride + t * TN;
      const char* pw = m0 == c * MC ? nw : nullptr;  // the first pass only
      tile_n<T, BITS>(std::min(MB, M - m0), wt, st, G, q, a, K, out, y_stride, pw, ns);
    }
  };
  // With many rows an item is long (~2 us at 64 rows) and a thread's items run in order, so
  // the prefetch above finds its next tile; the guided schedule hands out runs of them that
  // shrink towards the end, so a thread that the shared machine slowed (one stall stops both
  // at the barrier) leaves its last items to the other: 64-row decode steps 1.5-3% faster
  // while the host stalls threads, the same when it does not (docs/performance.md). With few
  // rows the items are short and the static split costs nothing to hand out.
  if (std::min(M, MC) >= GUIDED_ROWS) {
#pragma omp parallel for schedule(guided) num_threads(threads)
    for (int64_t item = 0; item < chunks * out_tiles; ++item) run_item(item);
  } else {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < chunks * out_tiles; ++item) run_item(item);
  }
}

}  // namespace

extern "C" {

// 1 when the vector (VNNI) path was compiled in, 0 for the scalar one.
int tm_w4a8_vnni() {
#if TM_W4A8_VNNI
  return 1;
#else
  return 0;
#endif
}

// 1 when the AVX2 path (no VNNI) was compiled in, else 0.
int tm_w4a8_avx2() {
#if TM_W4A8_AVX2
  return 1;
#else
  return 0;
#endif
}

// 1 when the AMX tile path was compiled in and the OS grants the tiles, else 0.
int tm_w4a8_amx() {
#if TM_W4A8_AMX
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// Sets the fewest rows that take the AMX path (the same bits either way; tests and
// benchmarks move it) and returns the previous value; rows < 0 only reads it.
int64_t tm_w4a8_set_amx_rows(int64_t rows) {
#if TM_W4A8_AMX
  return rows < 0 ? amx_rows.load() : amx_rows.exchange(rows);
#else
  (void)rows;
  return -1;
#endif
}

#define TM_QUANT_MATMUL(NAME, T, BITS, S)                                                     \
  void NAME(const T* x, int64_t x_stride, int64_t M, int64_t K, const uint8_t* w, const S* sc,  \
            int64_t N, T* y, int64_t y_stride, int threads) {                                   \
    quant_matmul<T, BITS>(x, x_stride, M, K, w, sc, N, y, y_stride, threads);                  \
  }
TM_QUANT_MATMUL(tm_w4a8_matmul_bf16, uint16_t, 4, uint16_t)
TM_QUANT_MATMUL(tm_w4a8_matmul_f32, float, 4, uint16_t)
TM_QUANT_MATMUL(tm_w8a8_matmul_bf16, uint16_t, 8, float)
TM_QUANT_MATMUL(tm_w8a8_matmul_f32, float, 8, float)

// y [M, N/2] = silu(gate) * up of x @ [gate | up]^T (int4 weights; N / 2 a multiple of 16).
void tm_w4a8_glu_bf16(const uint16_t* x, int64_t x_stride, int64_t M, int64_t K,
                      const uint8_t* w, const uint16_t* sc, int64_t N, uint16_t* y,
                      int64_t y_stride, int threads) {
  quant_matmul<uint16_t, 4, true>(x, x_stride, M, K, w, sc, N, y, y_stride, threads);
}
void tm_w4a8_glu_f32(const float* x, int64_t x_stride, int64_t M, int64_t K, const uint8_t* w,
                     const uint16_t* sc, int64_t N, float* y, int64_t y_stride, int threads) {
  quant_matmul<float, 4, true>(x, x_stride, M, K, w, sc, N, y, y_stride, threads);
}

}  // extern "C"
