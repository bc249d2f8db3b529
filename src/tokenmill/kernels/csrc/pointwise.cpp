// The pointwise layer ops for the CPU, each reproducing the rounding of the torch ops it
// replaces: residual add + RMSNorm, rotary embedding + KV-cache write, SiLU(gate) * up. Part
// of the library kernels/cpu.py builds from csrc/.
#include <omp.h>

#include "kv8.h"
#include "tm_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

using tmk::exp_neg;
using tmk::load;
using tmk::round_to;
using tmk::store;

// act[m] = silu(gate[m]) * up[m] for rows gu[m] = [gate (I) | up (I)] (tmk::silu_mul_row:
// torch's roundings).
template <typename T>
void silu_mul(const T* gu, T* act, int64_t M, int64_t I, int threads) {
  constexpr int64_t CH = 512;  // columns per work item
  const int64_t per_row = (I + CH - 1) / CH;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * I >= 16384)
  for (int64_t item = 0; item < M * per_row; ++item) {
    const int64_t m = item / per_row, lo = item % per_row * CH, hi = std::min(I, lo + CH);
    const T* g = gu + m * 2 * I;
    tmk::silu_mul_row(g + lo, g + I + lo, act + m * I + lo, hi - lo);
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
// E: the cache's element, T (rows copied) or int8_t (rows quantized into kv8.h's layout, bs
// keys a block).
template <typename T, typename E>
void rope_kv(T* qkv, int64_t qkv_stride, int64_t rows, int64_t Hq, int64_t Hk, int64_t D,
             const int64_t* positions, const T* cos, const T* sin, E* kc, E* vc,
             int64_t kv_head, int64_t bs, const int64_t* slots, int threads) {
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
      const T* k = row + (Hq + h) * D;
      const T* v = row + (Hq + Hk + h) * D;
      if constexpr (std::is_same_v<E, T>) {
        std::memcpy(kc + h * kv_head + slot * D, k, D * sizeof(T));
        std::memcpy(vc + h * kv_head + slot * D, v, D * sizeof(T));
      } else {
        float kf[1024], vf[1024];
        for (int64_t i = 0; i < D; ++i) {
          kf[i] = load(k, i);
          vf[i] = load(v, i);
        }
        const int64_t off = tmk::kv8::slot_offset(slot, bs, D), u = slot % tmk::kv8::SUB;
        tmk::kv8::store_k(kc + h * kv_head + off, u, kf, D);
        tmk::kv8::store_v(vc + h * kv_head + off, u, vf, D);
      }
    }
  }
}
#pragma GCC pop_options

}  // namespace

extern "C" {

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
// kv_head counts cache elements (bytes for the int8 cache, whose layout needs bs).
#define TM_ROPE_KV(NAME, T, E)                                                                \
  int64_t NAME(T* qkv, int64_t qkv_stride, int64_t rows, int64_t Hq, int64_t Hk, int64_t D,   \
               const int64_t* positions, int64_t n_positions, const T* cos, const T* sin,     \
               E* kc, E* vc, int64_t kv_head, int64_t bs, const int64_t* slots, int threads) { \
    for (int64_t t = 0; t < rows; ++t)                                                        \
      if (positions[t] < 0 || positions[t] >= n_positions) return t;                          \
    rope_kv(qkv, qkv_stride, rows, Hq, Hk, D, positions, cos, sin, kc, vc, kv_head, bs, slots, \
            threads);                                                                         \
    return -1;                                                                                \
  }
TM_ROPE_KV(tm_rope_kv_bf16, uint16_t, uint16_t)
TM_ROPE_KV(tm_rope_kv_f32, float, float)
TM_ROPE_KV(tm_rope_kv8_bf16, uint16_t, int8_t)
TM_ROPE_KV(tm_rope_kv8_f32, float, int8_t)

}  // extern "C"
