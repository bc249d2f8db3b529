// The w4a8 kernels' shared pieces (w4a8.cpp, w4a8_avx2.h): which integer path this build
// has, the packed layout's sizes, a row's quantized activations and the tile loop's helpers.
// Layouts and arithmetic: the comment at the top of w4a8.cpp.
#pragma once
#include <cstdint>
#include <cstring>

#include "tm_kernels.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TM_W4A8_VNNI 1
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define TM_W4A8_AMX 1
#endif
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 without VNNI (AMD Zen 2/3, Intel before Ice Lake): vpmaddubsw + vpmaddwd make the same
// exact integer sums as vpdpbusd, 8 output rows per vector (tile_rows_avx2).
#include <immintrin.h>
#define TM_W4A8_AVX2 1
#endif

namespace tmk::w4a8 {

constexpr int64_t GS = 32;          // quantization group along K (weights and activations)
constexpr int64_t TN = 16;          // output rows per tile
constexpr int64_t WB = TN * GS / 2;  // packed int4 weight bytes per tile and group
constexpr int64_t WB8 = TN * GS;     // packed int8 weight bytes per tile and group
constexpr int64_t MC = 64;           // activation rows per work item (a chunk of rows)

inline float to_float(float v) { return v; }
inline float to_float(uint16_t b) { return tmk::bf16_to_float(b); }
inline void from_float(float* p, float v) { *p = v; }
inline void from_float(uint16_t* p, float v) { *p = tmk::float_to_bf16(v); }

// A row's group of quantized activations, as the tile loop consumes it.
struct Act {
  float d;        // the scale
  float dsum;     // d * sum(a8): z's coefficient (int4 weights)
  int32_t corr;   // -8 * sum(a8): the integer dot product's start (int4 q is stored + 8)
  int32_t corr8;  // -128 * sum(a8): the same for int8 weights (q stored + 128)
};

inline void set_act(Act& a, float d, int32_t sum) {
  a.d = d;
  a.dsum = d * float(sum);
  a.corr = -8 * sum;
  a.corr8 = -128 * sum;
}

inline int32_t quad(const int8_t* p) {  // 4 activations as the dword vpdpbusd broadcasts
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Software prefetch of group g of the next tile (nw: its weights, ns: its scales; null: none)
// towards the L2, a group at a time, so the requests are spread over the whole tile's work.
// BYTES: weight bytes per tile and group. Always inlined: as a call inside the group loop it
// made the compiler spill the rows' accumulators around it (the LM head 10-30% slower).
template <int64_t BYTES>
[[gnu::always_inline]] inline void prefetch_group(const char* nw, const char* ns, int64_t g) {
  if (!nw) return;
  for (int64_t o = 0; o < BYTES; o += 64) __builtin_prefetch(nw + g * BYTES + o, 0, 2);
  __builtin_prefetch(ns + g * 4 * TN, 0, 2);
}

}  // namespace tmk::w4a8
