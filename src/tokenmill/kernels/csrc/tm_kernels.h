// The C entry points of tokenmill's CPU kernels, shared by their definitions (lora.cpp,
// attention.cpp, pointwise.cpp, sampling.cpp, w4a8.cpp, decode_stack.cpp) and by
// decode_stack.cpp, which chains them. Declaring them once lets the compiler check that every
// definition and every call agree, and kernels/cpu.py reads its ctypes signatures from this
// block too (pointers, int64_t, int and float only, one declaration per entry point).
#pragma once
#include <cstdint>
#include <cstring>

extern "C" {
void tm_add_rmsnorm_bf16(const uint16_t*, int64_t, const uint16_t*, uint16_t*, const uint16_t*,
                         uint16_t*, int64_t, int64_t, float, int);
void tm_add_rmsnorm_f32(const float*, int64_t, const float*, float*, const float*, float*,
                        int64_t, int64_t, float, int);
int64_t tm_rope_kv_bf16(uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                        int64_t, const uint16_t*, const uint16_t*, uint16_t*, uint16_t*, int64_t,
                        const int64_t*, int);
int64_t tm_rope_kv_f32(float*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                       int64_t, const float*, const float*, float*, float*, int64_t,
                       const int64_t*, int);
void tm_paged_decode_bf16(const uint16_t*, int64_t, uint16_t*, const uint16_t*, const uint16_t*,
                          int64_t, int64_t, int64_t, const int64_t*, int64_t, const int64_t*,
                          const int64_t*, int64_t, int64_t, int64_t, float, float*, int64_t, int);
void tm_paged_decode_f32(const float*, int64_t, float*, const float*, const float*, int64_t,
                         int64_t, int64_t, const int64_t*, int64_t, const int64_t*,
                         const int64_t*, int64_t, int64_t, int64_t, float, float*, int64_t, int);
void tm_w4a8_matmul_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*,
                         const uint16_t*, int64_t, uint16_t*, int64_t, int);
void tm_w4a8_matmul_f32(const float*, int64_t, int64_t, int64_t, const uint8_t*,
                        const uint16_t*, int64_t, float*, int64_t, int);
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
int tm_w4a8_vnni();
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
}  // namespace tmk
