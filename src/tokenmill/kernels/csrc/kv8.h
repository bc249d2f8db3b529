// The int8 KV cache (`--kv-cache-dtype int8`): its layout and its quantizer, shared by the
// cache write (pointwise.cpp) and attention (attention.cpp). layers/kv_int8.py writes and
// reads the same bytes in torch.
//
// Each row (one token's K or V under one KV head) is quantized in groups of 32 dims as
// llama.cpp's q8_0 does: d = max|x| / 127, q = round-half-even(x * (1 / d)) in -127..127.
// A block of bs keys is bs / 16 sub-blocks of 16 keys, 18 * D bytes each, 64-byte aligned
// when D is a multiple of 32:
//   K: [D / 4][16 keys][4 dims] bytes holding q + 128 (unsigned): one 64-byte vector is 4
//      dims of all 16 keys, the layout vpdpbusd multiplies by 4 broadcast query bytes, so a
//      query's 16 scores come out in one register with no horizontal sums;
//   V: [16 keys][D] bytes holding q (signed): a key's row widens to float as it is summed;
//   then both: [D / 32][16 keys] float32 scales d, a group's 16 scales one vector.
#pragma once
#include <cstdint>
#include <cstring>

#include "tm_kernels.h"

namespace tmk::kv8 {

constexpr int64_t SUB = 16;  // keys per sub-block
constexpr int64_t GRP = 32;  // dims per scale

inline int64_t sub_bytes(int64_t D) { return 18 * D; }
inline int64_t block_bytes(int64_t bs, int64_t D) { return bs / SUB * sub_bytes(D); }

// The sub-block holding key position p of a sequence (block table `table`), and p's row in it.
inline int64_t sub_offset(const int64_t* table, int64_t p, int64_t bs, int64_t D) {
  return table[p / bs] * block_bytes(bs, D) + (p % bs) / SUB * sub_bytes(D);
}
inline int64_t slot_offset(int64_t slot, int64_t bs, int64_t D) {
  return slot / bs * block_bytes(bs, D) + (slot % bs) / SUB * sub_bytes(D);
}

// Key row x[0:D] at row u of sub-block sb.
inline void store_k(int8_t* sb, int64_t u, const float* x, int64_t D) {
  float* scales = reinterpret_cast<float*>(sb + SUB * D);
  for (int64_t g = 0; g < D / GRP; ++g) {
    int8_t q[GRP];
    tmk::quantize_group(x + g * GRP, q, &scales[g * SUB + u]);
    for (int64_t j = 0; j < GRP / 4; ++j) {  // 4 dims at a time: one dword of a vector
      uint32_t quad;
      std::memcpy(&quad, q + 4 * j, 4);
      quad ^= 0x80808080u;  // q + 128 in each byte
      std::memcpy(sb + (g * GRP / 4 + j) * 64 + u * 4, &quad, 4);
    }
  }
}

// Value row x[0:D] at row u of sub-block sb.
inline void store_v(int8_t* sb, int64_t u, const float* x, int64_t D) {
  float* scales = reinterpret_cast<float*>(sb + SUB * D);
  for (int64_t g = 0; g < D / GRP; ++g)
    tmk::quantize_group(x + g * GRP, sb + u * D + g * GRP, &scales[g * SUB + u]);
}

}  // namespace tmk::kv8
