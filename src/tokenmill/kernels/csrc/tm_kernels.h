// The C entry points of tokenmill's CPU kernels, shared by their definitions
// (cpu_kernels.cpp, w4a8.cpp), by decode_stack.cpp, which chains them, and mirrored by the
// ctypes argtypes in kernels/cpu.py. Declaring them once lets the compiler check that every
// definition and every call agree.
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
}

// bfloat16 <-> float as torch converts them: widening is a shift; narrowing rounds to nearest
// even (a NaN stays a NaN, quieted).
namespace tm {
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
}  // namespace tm
