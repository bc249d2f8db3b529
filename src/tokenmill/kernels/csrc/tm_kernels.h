// The C entry points of tokenmill's CPU kernels, shared by their definitions (lora.cpp,
// attention.cpp, pointwise.cpp, sampling.cpp, w4a8.cpp, dense.cpp, decode_stack.cpp) and by
// decode_stack.cpp, which chains them. Declaring them once lets the compiler check that every
// definition and every call agree, and kernels/cpu.py reads its ctypes signatures from this
// block too (pointers, int64_t, int and float only, one declaration per entry point).
#pragma once
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

extern "C" {
void tm_add_rmsnorm_bf16(const uint16_t*, int64_t, const uint16_t*, uint16_t*, const uint16_t*,
                         uint16_t*, int64_t, int64_t, float, int);
void tm_add_rmsnorm_f32(const float*, int64_t, const float*, float*, const float*, float*,
                        int64_t, int64_t, float, int);
int64_t tm_rope_kv_bf16(uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                        int64_t, const uint16_t*, const uint16_t*, uint16_t*, uint16_t*, int64_t,
                        int64_t, const int64_t*, int);
int64_t tm_rope_kv_f32(float*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                       int64_t, const float*, const float*, float*, float*, int64_t, int64_t,
                       const int64_t*, int);
int64_t tm_rope_kv8_bf16(uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                         int64_t, const uint16_t*, const uint16_t*, int8_t*, int8_t*, int64_t,
                         int64_t, const int64_t*, int);
int64_t tm_rope_kv8_f32(float*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                        int64_t, const float*, const float*, int8_t*, int8_t*, int64_t, int64_t,
                        const int64_t*, int);
void tm_paged_decode_bf16(const uint16_t*, int64_t, uint16_t*, const uint16_t*, const uint16_t*,
                          int64_t, int64_t, int64_t, const int64_t*, int64_t, const int64_t*,
                          const int64_t*, int64_t, int64_t, int64_t, float, float*, int64_t, int);
void tm_paged_decode_f32(const float*, int64_t, float*, const float*, const float*, int64_t,
                         int64_t, int64_t, const int64_t*, int64_t, const int64_t*,
                         const int64_t*, int64_t, int64_t, int64_t, float, float*, int64_t, int);
void tm_paged_decode_kv8_bf16(const uint16_t*, int64_t, uint16_t*, const int8_t*, const int8_t*,
                              int64_t, int64_t, int64_t, const int64_t*, int64_t,
                              const int64_t*, const int64_t*, int64_t, int64_t, int64_t, float,
                              float*, int64_t, int);
void tm_paged_decode_kv8_f32(const float*, int64_t, float*, const int8_t*, const int8_t*,
                             int64_t, int64_t, int64_t, const int64_t*, int64_t, const int64_t*,
                             const int64_t*, int64_t, int64_t, int64_t, float, float*, int64_t,
                             int);
void tm_w4a8_matmul_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*,
                         const uint16_t*, int64_t, uint16_t*, int64_t, int);
void tm_w4a8_matmul_f32(const float*, int64_t, int64_t, int64_t, const uint8_t*,
                        const uint16_t*, int64_t, float*, int64_t, int);
void tm_w4a8_glu_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*,
                      const uint16_t*, int64_t, uint16_t*, int64_t, int);
void tm_w4a8_glu_f32(const float*, int64_t, int64_t, int64_t, const uint8_t*, const uint16_t*,
                     int64_t, float*, int64_t, int);
void tm_w8a8_matmul_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*,
                         const float*, int64_t, uint16_t*, int64_t, int);
void tm_w8a8_matmul_f32(const float*, int64_t, int64_t, int64_t, const uint8_t*, const float*,
                        int64_t, float*, int64_t, int);
void tm_silu_mul_bf16(const uint16_t*, uint16_t*, int64_t, int64_t, int);
void tm_silu_mul_f32(const float*, float*, int64_t, int64_t, int);
void tm_lora_sgmv_bf16(const uint16_t*, int64_t, uint16_t*, int64_t, const uint16_t*, int64_t,
                       const uint16_t*, int64_t, const int64_t*, const int64_t*, const int64_t*,
                       int64_t, int64_t, int64_t, int64_t, const int64_t*, int64_t, float*,
                       float*, int);
void tm_lora_sgmv_f32(const float*, int64_t, float*, int64_t, const float*, int64_t,
                      const float*, int64_t, const int64_t*, const int64_t*, const int64_t*,
                      int64_t, int64_t, int64_t, int64_t, const int64_t*, int64_t, float*,
                      float*, int);
void tm_argmax_bf16(const uint16_t*, int64_t, int64_t, int64_t, int64_t*, int);
void tm_argmax_f32(const float*, int64_t, int64_t, int64_t, int64_t*, int);
void tm_dense_matmul_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                          uint16_t*, int64_t, int);
void tm_dense_matmul_f32(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*,
                         int64_t, int);
void tm_dense_glu_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                       uint16_t*, int64_t, int);
void tm_dense_glu_f32(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*,
                      int64_t, int);
int tm_dense_bf16dot();
int tm_w4a8_vnni();
int tm_w4a8_avx2();
int tm_w4a8_amx();
int64_t tm_w4a8_set_amx_rows(int64_t);
int tm_abi_version();
// The fused stack's structures, defined in decode_stack.cpp and mirrored by ctypes structures
// in models/fused_stack.py.
struct TmLayer;
struct TmStack;
struct TmStep;
int64_t tm_decode_stack_bf16(const TmLayer*, const TmStack*, const TmStep*);
int64_t tm_decode_stack_f32(const TmLayer*, const TmStack*, const TmStep*);
}

// bfloat16 <-> float as torch converts them: widening is a shift; narrowing rounds to nearest
// even (a NaN stays a NaN, quieted).
namespace tmk {
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = ((u & 0x7fffffffu) > 0x7f800000u) ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Element access in float32 whatever the storage type, and the softmax's exp.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return tmk::bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = tmk::float_to_bf16(v); }

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

// Round a float to T's precision (bfloat16: nearest even), as a torch op producing T does.
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) {
  uint16_t b;
  store(&b, 0, v);
  return load(&b, 0);
}

// a[i] = silu(g[i]) * u[i] for i < n with torch's roundings (`F.silu(gate) * up` in T):
// silu(x) = x * sigmoid(x) in float32, rounded to T, then the product rounded; sigmoid from
// exp_neg of -|x| (no overflow): 1 / (1 + e) or e / (1 + e). pointwise.cpp's SiLU · up and
// the matmuls' SiLU epilogue (w4a8.cpp, dense.cpp) share it, so they give the same bits.
template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = load(g, i);
    const float e = exp_neg(x < 0.f ? x : -x);
    const float sig = (x < 0.f ? e : 1.f) / (1.f + e);
    const float silu = round_to(x * sig, g);
    store(a, i, silu * load(u, i));
  }
}

// One group of 32 values quantized to int8 as llama.cpp's q8_0/Q8_1 blocks: d = max|x| / 127,
// q = round-half-even(x * (1 / d)) clamped to +-127 (d = 0: q = 0); returns the sum of q.
// The activations of the quantized matmuls (w4a8.cpp) and the int8 KV cache's rows (kv8.h);
// the same float operations as layers/quant.py's `quantize_activations` and
// layers/kv_int8.py's `quantize`, so those agree bit for bit (NaN inputs aside).
#if defined(__AVX512F__)
// 16 vectors of 16 floats -> one vector whose lane j is v[j]'s lanes combined by `op` (add or
// max): pairwise unpacks within 128-bit lanes, then a 4 x 4 transpose of the lanes; 24
// shuffles and ops for 16 results instead of a horizontal reduction (~8 ops, a long latency
// chain) each.
template <typename Op>
inline __m512 reduce16(const __m512 (&v)[16], Op op) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = op(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = op(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
              _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x0 = op(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x1 = op(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return op(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
            _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}
inline __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 vmax(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }

// 16 floats from float or bfloat16 storage.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline int32_t quantize_group(__m512 a, __m512 b, int8_t* q, float* d) {  // the 32 values
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  *d = amax / 127.f;
  const __m512 id = _mm512_set1_ps(*d > 0.f ? 1.f / *d : 0.f);
  const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  // The default MXCSR rounding is to nearest even, as nearbyint and torch.round.
  const __m512i qa = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(a, id), hi), lo));
  const __m512i qb = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(b, id), hi), lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
}
// The same from 32 bfloat16 values, widened in registers.
inline int32_t quantize_group(const uint16_t* v, int8_t* q, float* d) {
  return quantize_group(load16(v), load16(v + 16), q, d);
}
#elif defined(__AVX2__)
// AVX2 (no AVX-512): the same float operations on 4 vectors of 8, so the same bits.
inline int32_t quantize_group(const __m256 (&v)[4], int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  *d = _mm_cvtss_f32(h) / 127.f;
  const __m256 id = _mm256_set1_ps(*d > 0.f ? 1.f / *d : 0.f);
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  __m256i qi[4];
  for (int j = 0; j < 4; ++j)  // the MXCSR's rounding: to nearest even, as nearbyint
    qi[j] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(v[j], id), hi), lo));
  // Packing works within 128-bit lanes: dwords 0, 4, 1, 5, ... put the bytes back in order.
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]),
                                       _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(t);
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
template <typename T>
inline int32_t quantize_group(const T* v, int8_t* q, float* d) {
  const __m256 x[4] = {load8(v), load8(v + 8), load8(v + 16), load8(v + 24)};
  return quantize_group(x, q, d);
}
#endif
#if !defined(__AVX2__) || defined(__AVX512F__)
inline int32_t quantize_group(const float* v, int8_t* q, float* d) {
#if defined(__AVX512F__)
  return quantize_group(_mm512_loadu_ps(v), _mm512_loadu_ps(v + 16), q, d);
#else
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
  *d = amax / 127.f;
  const float id = *d > 0.f ? 1.f / *d : 0.f;
  int32_t s = 0;
  for (int i = 0; i < 32; ++i) {
    const float r = std::nearbyint(std::max(std::min(v[i] * id, 127.f), -127.f));
    q[i] = int8_t(r);
    s += int32_t(r);
  }
  return s;
#endif
}
#endif
#if !defined(__AVX512F__) && !defined(__AVX2__)
inline int32_t quantize_group(const uint16_t* v, int8_t* q, float* d) {
  float f[32];
  for (int i = 0; i < 32; ++i) f[i] = bf16_to_float(v[i]);
  return quantize_group(f, q, d);
}
#endif
}  // namespace tmk
