// The whole decoder stack of a step in one call (CPU; w4a8 or dense weights): per layer
// residual add + RMSNorm, the qkv matmul (+ bias), rotary + KV-cache write, attention from
// the paged cache, the output matmul, add + RMSNorm, gate/up, SiLU * up, down. It chains the
// kernels of pointwise.cpp, attention.cpp, w4a8.cpp and dense.cpp through their C entry
// points, in the order and with the arithmetic of the Python layers (models/llama.py, which
// call the same kernels), so a step gives the layer-by-layer path's bits; only Python's
// ~90 us per layer of glue is gone. Built into the same library (kernels/cpu.py); called by
// models/fused_stack.py.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <omp.h>

#include "tm_kernels.h"

// Mirrors of the ctypes structures in models/fused_stack.py (field order matters).
// Each matmul's weights: w4a8 (w: packed int4, s: its scales) or, s null, dense in the
// activations' dtype (w: dense.cpp's tiles).
struct TmLayer {
  const void* in_norm;
  const void* post_norm;
  const uint8_t* qkv_w;
  const uint16_t* qkv_s;
  const void* qkv_bias;  // null without attention bias
  const uint8_t* o_w;
  const uint16_t* o_s;
  const uint8_t* gu_w;
  const uint16_t* gu_s;
  const uint8_t* down_w;
  const uint16_t* down_s;
  void* kv;  // [2, Hk, kv_head] elements of the cache's type
};

struct TmStack {
  // kv_head: a KV head's cache elements, n_blocks * bs * D (int8 cache: bytes, kv8.h)
  int64_t n_layers, H, I, Hq, Hk, D, bs, kv_head;
  float eps, scale;
  const void* cos;
  const void* sin;
  int64_t n_positions;
  int64_t kv_int8;  // 1: the int8 cache (--kv-cache-dtype int8)
  const void* embed;       // the token embeddings [vocab, H] (read when a step gives ids)
  int64_t vocab;
  const void* final_norm;  // the final RMSNorm's weight [H] (applied when a step gives out)
};

struct TmStep {
  int64_t M;
  const int64_t* positions;
  const int64_t* slots;
  const int64_t* tables;  // [S, table_stride] per sequence
  int64_t table_stride;
  const int64_t* row_seq;  // [M] each row's sequence
  const int64_t* bounds;   // [M, 2] each row's key positions [start, end)
  int64_t max_keys;
  void* x;         // in: the embeddings [M, H] (ids: filled here); out: the last MLP's
  void* residual;  // out: the residual stream [M, H]
  void* h;         // scratch [M, max(H, Hq * D)]
  void* qkv;       // scratch [M, (Hq + 2 Hk) * D]
  void* gu;        // scratch [M, 2 I]
  void* act;       // scratch [M, I]
  float* attn_scratch;  // threads * (Hq / Hk) * max_keys floats
  int threads;
  // The rows whose output is wanted (ascending; null: all M). The last layer writes every
  // row's keys and values, then runs attention, o and the MLP for these rows only, compacted
  // to the front of x and residual (as llama.cpp does): a prompt's other rows feed no layer
  // after it. out_row_seq and out_bounds are row_seq and bounds of these rows.
  const int64_t* out_rows;
  int64_t n_out;
  const int64_t* out_row_seq;
  const int64_t* out_bounds;
  // Null, or 9 seconds to add each stage's wall time to (norm, qkv, rotary + cache write,
  // attention, o, norm, gate/up, SiLU * up, down: fused_stack.STAGES), for
  // benchmarks/step_stages.py.
  double* stage_seconds;
  // Null, or the step's token ids [M]: x is then their embeddings' rows (every id checked
  // first) instead of an input.
  const int64_t* ids;
  // Null, or [n_out, H]: the final norm of the output rows (x + residual), what the model
  // hands the LM head.
  void* out;
};

namespace {

using Layer = TmLayer;
using Stack = TmStack;
using Step = TmStep;

inline float to_float(float v) { return v; }
inline float to_float(uint16_t b) { return tmk::bf16_to_float(b); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = tmk::float_to_bf16(v); }

// The dtype-dispatched kernel entry points.
inline void norm(const uint16_t* x, const uint16_t* res, uint16_t* r_out, const void* w,
                 uint16_t* out, int64_t M, int64_t H, float eps, int t) {
  tm_add_rmsnorm_bf16(x, H, res, r_out, static_cast<const uint16_t*>(w), out, M, H, eps, t);
}
inline void norm(const float* x, const float* res, float* r_out, const void* w, float* out,
                 int64_t M, int64_t H, float eps, int t) {
  tm_add_rmsnorm_f32(x, H, res, r_out, static_cast<const float*>(w), out, M, H, eps, t);
}
inline void matmul(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s,
                   int64_t N, uint16_t* y, int t) {
  if (s) tm_w4a8_matmul_bf16(x, K, M, K, w, s, N, y, N, t);
  else tm_dense_matmul_bf16(x, K, M, K, reinterpret_cast<const uint16_t*>(w), N, y, N, t);
}
inline void matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s,
                   int64_t N, float* y, int t) {
  if (s) tm_w4a8_matmul_f32(x, K, M, K, w, s, N, y, N, t);
  else tm_dense_matmul_f32(x, K, M, K, reinterpret_cast<const float*>(w), N, y, N, t);
}
// Rotary + cache write and attention for activations T (bfloat16 bits or float) over a cache
// of element E: T, or int8 (bytes).
template <typename T, typename E>
inline int64_t rope(T* qkv, const Stack& c, const Step& s, E* kc, E* vc) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>, int8 = std::is_same_v<E, int8_t>;
  int64_t (*fn)(T*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                const T*, const T*, E*, E*, int64_t, int64_t, const int64_t*, int);
  if constexpr (bf16 && int8) fn = tm_rope_kv8_bf16;
  else if constexpr (bf16) fn = tm_rope_kv_bf16;
  else if constexpr (int8) fn = tm_rope_kv8_f32;
  else fn = tm_rope_kv_f32;
  return fn(qkv, (c.Hq + 2 * c.Hk) * c.D, s.M, c.Hq, c.Hk, c.D, s.positions, c.n_positions,
            static_cast<const T*>(c.cos), static_cast<const T*>(c.sin), kc, vc, c.kv_head,
            c.bs, s.slots, s.threads);
}
template <typename T, typename E>
inline void attend(const T* qkv, T* out, const E* kc, const E* vc, const Stack& c,
                   const Step& s) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>, int8 = std::is_same_v<E, int8_t>;
  void (*fn)(const T*, int64_t, T*, const E*, const E*, int64_t, int64_t, int64_t,
             const int64_t*, int64_t, const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
             float, float*, int64_t, int);
  if constexpr (bf16 && int8) fn = tm_paged_decode_kv8_bf16;
  else if constexpr (bf16) fn = tm_paged_decode_bf16;
  else if constexpr (int8) fn = tm_paged_decode_kv8_f32;
  else fn = tm_paged_decode_f32;
  fn(qkv, (c.Hq + 2 * c.Hk) * c.D, out, kc, vc, c.kv_head, c.bs, c.D, s.tables, s.table_stride,
     s.row_seq, s.bounds, s.M, c.Hq, c.Hk, c.scale, s.attn_scratch, s.max_keys, s.threads);
}

// silu(gate) * up of x @ [gate | up]^T (N = 2I) in one pass (the matmul's SiLU epilogue).
inline void glu(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s,
                int64_t N, uint16_t* y, int t) {
  if (s) tm_w4a8_glu_bf16(x, K, M, K, w, s, N, y, N / 2, t);
  else tm_dense_glu_bf16(x, K, M, K, reinterpret_cast<const uint16_t*>(w), N, y, N / 2, t);
}
inline void glu(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s,
                int64_t N, float* y, int t) {
  if (s) tm_w4a8_glu_f32(x, K, M, K, w, s, N, y, N / 2, t);
  else tm_dense_glu_f32(x, K, M, K, reinterpret_cast<const float*>(w), N, y, N / 2, t);
}
inline void silu_mul(const uint16_t* gu, uint16_t* act, int64_t M, int64_t I, int t) {
  tm_silu_mul_bf16(gu, act, M, I, t);
}
inline void silu_mul(const float* gu, float* act, int64_t M, int64_t I, int t) {
  tm_silu_mul_f32(gu, act, M, I, t);
}

// Adds the time since the last mark to stage i, when timing (t null: not timing).
struct Clock {
  double* t;
  double last;
  explicit Clock(double* seconds) : t(seconds), last(seconds ? omp_get_wtime() : 0.) {}
  void mark(int i) {
    if (!t) return;
    const double now = omp_get_wtime();
    t[i] += now - last;
    last = now;
  }
};

// The last layer's rows after its cache write: the step's rows, or (s.out_rows) only those
// whose output is wanted, their qkv and residual rows moved to the front.
template <typename T>
Step output_rows(const Step& s, T* qkv, T* res, int64_t NQKV, int64_t H) {
  Step rows = s;
  if (!s.out_rows || s.n_out >= s.M) return rows;
  for (int64_t i = 0; i < s.n_out; ++i) {  // ascending: row i only moves forward
    const int64_t r = s.out_rows[i];
    if (r == i) continue;
    std::memcpy(qkv + i * NQKV, qkv + r * NQKV, NQKV * sizeof(T));
    std::memcpy(res + i * H, res + r * H, H * sizeof(T));
  }
  rows.M = s.n_out;
  rows.row_seq = s.out_row_seq;
  rows.bounds = s.out_bounds;
  return rows;
}

// Returns -1; or the row whose position is outside the rotary table; or -2 - the row whose
// token id is outside the embeddings (nothing written then, in the cache or out).
// E: the cache's element (T, or int8_t).
template <typename T, typename E>
int64_t run(const Layer* layers, const Stack& c, const Step& s) {
  const int64_t M = s.M, H = c.H, NQKV = (c.Hq + 2 * c.Hk) * c.D, HQD = c.Hq * c.D;
  T* x = static_cast<T*>(s.x);
  T* res = static_cast<T*>(s.residual);
  T* h = static_cast<T*>(s.h);
  T* qkv = static_cast<T*>(s.qkv);
  T* gu = static_cast<T*>(s.gu);
  T* act = static_cast<T*>(s.act);
  if (s.ids) {  // the embedding lookup: a copy of each id's row
    for (int64_t m = 0; m < M; ++m)
      if (s.ids[m] < 0 || s.ids[m] >= c.vocab) return -2 - m;
    const T* e = static_cast<const T*>(c.embed);
    for (int64_t m = 0; m < M; ++m) std::memcpy(x + m * H, e + s.ids[m] * H, H * sizeof(T));
  }
  Clock clock(s.stage_seconds);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const Layer& L = layers[l];
    E* kc = static_cast<E*>(L.kv);
    E* vc = kc + c.Hk * c.kv_head;
    norm(x, l == 0 ? nullptr : res, res, L.in_norm, h, M, H, c.eps, s.threads);
    clock.mark(0);
    matmul(h, M, H, L.qkv_w, L.qkv_s, NQKV, qkv, s.threads);
    if (L.qkv_bias) {
      const T* b = static_cast<const T*>(L.qkv_bias);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < NQKV; ++j) {
          T* p = qkv + m * NQKV + j;
          put(p, to_float(*p) + to_float(b[j]));
        }
    }
    clock.mark(1);
    const int64_t bad = rope(qkv, c, s, kc, vc);
    if (bad >= 0) return bad;
    // the rows the rest of the layer runs for
    const Step rows = l == c.n_layers - 1 ? output_rows(s, qkv, res, NQKV, H) : s;
    const int64_t R = rows.M;
    clock.mark(2);
    attend(qkv, h, kc, vc, c, rows);  // h: [R, Hq * D] attention output
    clock.mark(3);
    matmul(h, R, HQD, L.o_w, L.o_s, H, x, s.threads);
    clock.mark(4);
    norm(x, res, res, L.post_norm, h, R, H, c.eps, s.threads);
    clock.mark(5);
    if (c.I % 16 == 0) {  // whole tiles in each half: SiLU · up in the matmul (stage 7 ~0)
      glu(h, R, H, L.gu_w, L.gu_s, 2 * c.I, act, s.threads);
      clock.mark(6);
    } else {
      matmul(h, R, H, L.gu_w, L.gu_s, 2 * c.I, gu, s.threads);
      clock.mark(6);
      silu_mul(gu, act, R, c.I, s.threads);
    }
    clock.mark(7);
    matmul(act, R, c.I, L.down_w, L.down_s, H, x, s.threads);
    clock.mark(8);
  }
  if (s.out) {  // the final norm, as the model's RMSNorm computes it (the same kernel)
    const int64_t R = s.out_rows && s.n_out < M ? s.n_out : M;
    norm(x, res, res, c.final_norm, static_cast<T*>(s.out), R, H, c.eps, s.threads);
  }
  return -1;
}

}  // namespace

extern "C" {

int64_t tm_decode_stack_bf16(const Layer* layers, const Stack* c, const Step* s) {
  return c->kv_int8 ? run<uint16_t, int8_t>(layers, *c, *s)
                    : run<uint16_t, uint16_t>(layers, *c, *s);
}
int64_t tm_decode_stack_f32(const Layer* layers, const Stack* c, const Step* s) {
  return c->kv_int8 ? run<float, int8_t>(layers, *c, *s) : run<float, float>(layers, *c, *s);
}

}  // extern "C"
