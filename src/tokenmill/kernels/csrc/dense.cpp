// Dense matmuls on the CPU, y = x @ W^T with W of the activations' dtype (bfloat16 or float32),
// from a packed layout (layers/dense.py `DenseWeight.pack`): the unquantized layers' path at
// every row count, and the dense weights of the fused decoder stack (decode_stack.cpp).
//
// Layout: tiles of 16 output rows, N/16 of them one after the other. bfloat16: a tile is K/2
// vectors of 64 bytes, vector p = for each row r of the tile the pair (w[r][2p], w[r][2p+1]),
// the operand layout of AVX512-BF16's vdpbf16ps; float32: K vectors of 16 floats, vector k =
// w[r][k] for each row r.
//
// Arithmetic: each output (m, n) has one float32 accumulator, starting at 0, and takes its
// products in k order: bfloat16, per pair p, acc += w[2p+1] x[2p+1] then acc += w[2p] x[2p]
// (vdpbf16ps's order; the products of bfloat16 values are exact in float32, so each step is a
// fused multiply-add, as the widening paths perform it); float32, acc = fma(w[k], x[k], acc).
// The sequence is the same whatever the number of rows, the row and tile blocks or the
// threads, so every row gets the same bits alone as in any batch (batch invariance); the
// result is rounded once to the output's dtype (bfloat16: to nearest even, as torch).
// vdpbf16ps treats subnormal inputs and outputs as zero, the widening paths do not: builds
// may differ there, and only there.
//
// Speed: a decode step's weights are read once per row block from memory, ~2x oneDNN's
// matmul at 1-16 rows on SmolLM2's shapes (benchmarks/dense_cpu.py); many rows are a
// register-blocked loop of 6 rows x 4 tiles (AVX-512).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "tm_kernels.h"

namespace {

using tmk::bf16_to_float;
using tmk::float_to_bf16;

constexpr int64_t TN = 16;  // output rows (columns of y) per tile
constexpr int64_t MC = 64;  // activation rows per work item

// The vector of the build: lanes of float32, a tile's 16 columns in 16 / L vectors.
#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
#define TM_DENSE_BF16DOT 1
#else
#define TM_DENSE_BF16DOT 0
#endif
using V = __m512;
using VI = __m512i;
constexpr int L = 16;
constexpr int MAX_NR = 6, MAX_TB = 4;  // 24 accumulators of 32 registers
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline VI vloadi(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vset(float v) { return _mm512_set1_ps(v); }
inline V even(VI u) { return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)); }
inline V odd(VI u) {
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
// 16 floats to bfloat16 as tmk::float_to_bf16 rounds them (nearest even; a NaN quieted).
inline void vstore(uint16_t* p, V v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i r = _mm512_add_epi32(
      u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                          _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i b = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define TM_DENSE_BF16DOT 0
using V = __m256;
using VI = __m256i;
constexpr int L = 8;
constexpr int MAX_NR = 4, MAX_TB = 1;  // 8 accumulators of 16 registers
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline VI vloadi(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vset(float v) { return _mm256_set1_ps(v); }
inline V even(VI u) { return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)); }
inline V odd(VI u) {
  return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
}
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void vstore(uint16_t* p, V v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int i = 0; i < 8; ++i) p[i] = float_to_bf16(f[i]);
}
#else
#define TM_DENSE_BF16DOT 0
using V = float;
using VI = uint32_t;
constexpr int L = 1;
constexpr int MAX_NR = 4, MAX_TB = 1;
inline V vzero() { return 0.f; }
inline V vload(const float* p) { return *p; }
inline VI vloadi(const uint16_t* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
  return u;
}
inline V vfma(V a, V b, V c) { return __builtin_fmaf(a, b, c); }
inline V vset(float v) { return v; }
inline V even(VI u) {
  const uint32_t b = u << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline V odd(VI u) {
  const uint32_t b = u & 0xFFFF0000u;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline void vstore(float* p, V v) { *p = v; }
inline void vstore(uint16_t* p, V v) { *p = float_to_bf16(v); }
#endif
constexpr int VT = TN / L;  // vectors per tile row

inline uint32_t pair(const uint16_t* x) {  // x[0], x[1] as one dword
  uint32_t u;
  std::memcpy(&u, x, 4);
  return u;
}

// NR rows of x (from x, row stride xs) times TB tiles (from w, tile_len elements apart) into
// y (row stride ys), the tiles' 16 columns each.
template <int NR, int TB>
inline void block(const uint16_t* x, int64_t xs, int64_t K, const uint16_t* w,
                  int64_t tile_len, uint16_t* y, int64_t ys) {
  V acc[NR][TB][VT];
  for (int m = 0; m < NR; ++m)
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < VT; ++v) acc[m][t][v] = vzero();
  for (int64_t p = 0; p < K / 2; ++p) {
#if TM_DENSE_BF16DOT
    __m512i wv[TB];
    for (int t = 0; t < TB; ++t) wv[t] = _mm512_loadu_si512(w + t * tile_len + p * 2 * TN);
    for (int m = 0; m < NR; ++m) {
      const __m512i xb = _mm512_set1_epi32(int32_t(pair(x + m * xs + 2 * p)));
      for (int t = 0; t < TB; ++t)
        acc[m][t][0] = _mm512_dpbf16_ps(acc[m][t][0], (__m512bh)wv[t], (__m512bh)xb);
    }
#else
    V we[TB][VT], wo[TB][VT];
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < VT; ++v) {
        const VI u = vloadi(w + t * tile_len + p * 2 * TN + v * 2 * L);
        we[t][v] = even(u);
        wo[t][v] = odd(u);
      }
    for (int m = 0; m < NR; ++m) {
      const V xe = vset(bf16_to_float(x[m * xs + 2 * p]));
      const V xo = vset(bf16_to_float(x[m * xs + 2 * p + 1]));
      for (int t = 0; t < TB; ++t)
        for (int v = 0; v < VT; ++v) {
          acc[m][t][v] = vfma(wo[t][v], xo, acc[m][t][v]);
          acc[m][t][v] = vfma(we[t][v], xe, acc[m][t][v]);
        }
    }
#endif
  }
  for (int m = 0; m < NR; ++m)
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < VT; ++v) vstore(y + m * ys + t * TN + v * L, acc[m][t][v]);
}

template <int NR, int TB>
inline void block(const float* x, int64_t xs, int64_t K, const float* w, int64_t tile_len,
                  float* y, int64_t ys) {
  V acc[NR][TB][VT];
  for (int m = 0; m < NR; ++m)
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < VT; ++v) acc[m][t][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    V wv[TB][VT];
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < VT; ++v) wv[t][v] = vload(w + t * tile_len + k * TN + v * L);
    for (int m = 0; m < NR; ++m) {
      const V xb = vset(x[m * xs + k]);
      for (int t = 0; t < TB; ++t)
        for (int v = 0; v < VT; ++v) acc[m][t][v] = vfma(wv[t][v], xb, acc[m][t][v]);
    }
  }
  for (int m = 0; m < NR; ++m)
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < VT; ++v) vstore(y + m * ys + t * TN + v * L, acc[m][t][v]);
}

// One row block of nr rows against tb tiles: the template instance for these counts.
template <typename T, int TB>
inline void rows(int64_t nr, const T* x, int64_t xs, int64_t K, const T* w, int64_t tl, T* y,
                 int64_t ys) {
  static_assert(MAX_NR <= 6);
  switch (nr) {
    case 1: block<1, TB>(x, xs, K, w, tl, y, ys); break;
    case 2: block<2, TB>(x, xs, K, w, tl, y, ys); break;
    case 3: block<3, TB>(x, xs, K, w, tl, y, ys); break;
    case 4: block<4, TB>(x, xs, K, w, tl, y, ys); break;
    case 5: block<5, TB>(x, xs, K, w, tl, y, ys); break;
    default: block<6, TB>(x, xs, K, w, tl, y, ys);
  }
}

template <typename T>
void tiles(int64_t nr, int64_t tb, const T* x, int64_t xs, int64_t K, const T* w, int64_t tl,
           T* y, int64_t ys) {
  if constexpr (MAX_TB >= 4) {
    if (tb >= 4) return rows<T, MAX_TB>(nr, x, xs, K, w, tl, y, ys);
    if (tb == 3) return rows<T, 3>(nr, x, xs, K, w, tl, y, ys);
    if (tb == 2) return rows<T, 2>(nr, x, xs, K, w, tl, y, ys);
  }
  for (int64_t t = 0; t < tb; ++t)
    rows<T, 1>(nr, x, xs, K, w + t * tl, tl, y + t * TN, ys);
}

// y = x @ W^T, or with GLU (W = [gate | up], N = 2I, I a multiple of 16) y = silu(gate) *
// up [M, I]: an item's gate and up tiles of the same columns rounded to T in a buffer and
// combined (tmk::silu_mul_row): the bits of the matmul then pointwise.cpp's SiLU · up.
template <typename T, bool GLU = false>
void matmul(const T* x, int64_t xs, int64_t M, int64_t K, const T* w, int64_t N, T* y,
            int64_t ys, int threads) {
  const int64_t tl = TN * K, chunks = (M + MC - 1) / MC;
  const int64_t n_tiles = GLU ? N / TN / 2 : N / TN;  // output tiles (GLU: the gate's)
  // Tiles per item: up to MAX_TB (more independent accumulators for few rows), fewer when
  // the items would be too few to share out evenly among the threads.
  const int64_t want = std::max<int64_t>(1, n_tiles * chunks / (8 * int64_t(threads)));
  const int64_t tb = std::min<int64_t>(MAX_TB, want);
  const int64_t groups = (n_tiles + tb - 1) / tb;
  // Items (chunk of MC rows, tile group), tile groups innermost: a thread's consecutive items
  // share a chunk, whose rows stay in cache while the weights stream past.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < chunks * groups; ++item) {
    const int64_t c = item / groups, t0 = (item % groups) * tb;
    const int64_t nt = std::min(tb, n_tiles - t0);
    for (int64_t m0 = c * MC; m0 < std::min(M, c * MC + MC); m0 += MAX_NR) {
      const int64_t nr = std::min<int64_t>(MAX_NR, std::min(M, c * MC + MC) - m0);
      if constexpr (GLU) {
        constexpr int64_t W = MAX_TB * TN;
        alignas(64) T g[MAX_NR * W], u[MAX_NR * W];
        tiles<T>(nr, nt, x + m0 * xs, xs, K, w + t0 * tl, tl, g, W);
        tiles<T>(nr, nt, x + m0 * xs, xs, K, w + (n_tiles + t0) * tl, tl, u, W);
        for (int64_t r = 0; r < nr; ++r)
          tmk::silu_mul_row(g + r * W, u + r * W, y + (m0 + r) * ys + t0 * TN, nt * TN);
      } else {
        tiles<T>(nr, nt, x + m0 * xs, xs, K, w + t0 * tl, tl, y + m0 * ys + t0 * TN, ys);
      }
    }
  }
}

}  // namespace

extern "C" {

void tm_dense_matmul_bf16(const uint16_t* x, int64_t x_stride, int64_t M, int64_t K,
                          const uint16_t* w, int64_t N, uint16_t* y, int64_t y_stride,
                          int threads) {
  matmul(x, x_stride, M, K, w, N, y, y_stride, threads);
}
void tm_dense_matmul_f32(const float* x, int64_t x_stride, int64_t M, int64_t K, const float* w,
                         int64_t N, float* y, int64_t y_stride, int threads) {
  matmul(x, x_stride, M, K, w, N, y, y_stride, threads);
}
// y [M, N/2] = silu(gate) * up of x @ [gate | up]^T (N / 2 a multiple of 16).
void tm_dense_glu_bf16(const uint16_t* x, int64_t x_stride, int64_t M, int64_t K,
                       const uint16_t* w, int64_t N, uint16_t* y, int64_t y_stride, int threads) {
  matmul<uint16_t, true>(x, x_stride, M, K, w, N, y, y_stride, threads);
}
void tm_dense_glu_f32(const float* x, int64_t x_stride, int64_t M, int64_t K, const float* w,
                      int64_t N, float* y, int64_t y_stride, int threads) {
  matmul<float, true>(x, x_stride, M, K, w, N, y, y_stride, threads);
}
// 1 when bfloat16 weights take AVX512-BF16's dot products, 0 when they are widened.
int tm_dense_bf16dot() { return TM_DENSE_BF16DOT; }

}  // extern "C"
