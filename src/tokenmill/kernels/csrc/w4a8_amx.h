// The w4a8 and w8a8 matmuls on AMX tiles (Intel Sapphire Rapids and later, `amx_int8`):
// exact integer sums by TDPBSSD, then the vector path's float operations in its order: the
// same bits. Included by w4a8.cpp only (quant_matmul takes it from amx_rows rows).
#pragma once
#include "w4a8.h"

#if TM_W4A8_AMX
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace tmk::w4a8 {

// AMX (Intel's tile matrix unit): one TDPBSSD multiplies a 16-row x 32 int8 tile of
// activations (one group) by a 32 x 16-column tile of int8 weights into 16 x 16 int32 sums:
// 8192 products, the work of 128 vpdpbusd. The sums are the integer t of the vector path
// (weights made signed, q - 8 or q, instead of its + 8 / + 128 and correction), so the float
// operations on them, per row and group acc = fma(float(t), s * d, acc) and, for int4,
// acc = fma(z, d * sum(a8), acc), are the vector path's in the same order: the same bits,
// whichever path a batch of rows takes. Those 3-4 float operations per row and group (the
// vector path: 8 vpdpbusd more) are now the loop's cost.
inline std::atomic<int64_t> amx_rows{16};  // the fewest rows that take the tile path

// Linux grants a process the tiles' 8 KB of register state only on request, once.
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// tmm0, tmm1: sums, 16 rows x 16 int32 (two, so that one group's products overlap the
// previous group's float work); tmm2, tmm3: activations, 16 rows x 32 int8; tmm4, tmm5:
// weights, 8 rows of 4 consecutive k x 16 columns (the vpdpbusd layout). Loaded by every
// thread at every call: torch's oneDNN may have loaded its own configuration since.
inline void configure_tiles() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 2; ++t) {
    cfg.rows[t] = 16, cfg.colsb[t] = 64;
    cfg.rows[2 + t] = 16, cfg.colsb[2 + t] = GS;
    cfg.rows[4 + t] = GS / 4, cfg.colsb[4 + t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// A tile's G groups of weights as signed int8 tiles, 512 bytes a group: int4 q - 8 from the
// nibbles (vector j: k-quads j and j + 4), int8 q from q + 128 (vector c: k-quad c).
template <int BITS>
void signed_tile(const uint8_t* w, int64_t G, int8_t* out) {
  const __m512i nib = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  const __m512i flip = _mm512_set1_epi8(int8_t(0x80));
  for (int64_t g = 0; g < G; ++g) {
    __m512i* o = reinterpret_cast<__m512i*>(out + g * 512);
    if constexpr (BITS == 4) {
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(w + g * WB + 64 * j);
        _mm512_store_si512(o + j, _mm512_sub_epi8(_mm512_and_si512(v, nib), eight));
        _mm512_store_si512(o + 4 + j, _mm512_sub_epi8(
            _mm512_and_si512(_mm512_srli_epi16(v, 4), nib), eight));
      }
    } else {
      for (int c = 0; c < 8; ++c)
        _mm512_store_si512(o + c, _mm512_xor_si512(_mm512_loadu_si512(w + g * WB8 + 64 * c), flip));
    }
  }
}

// Group g's sums for the 16 rows at xq into tile C (A, B: its operand tiles), then into buf
// (16 x 16 int32). A macro: the tile intrinsics take register numbers as literals.
#define TM_GROUP_SUMS(C, A, B, g, buf)          \
  do {                                          \
    _tile_zero(C);                              \
    _tile_loadd(A, xq + (g) * GS, K);           \
    _tile_loadd(B, wt + (g) * 512, 64);         \
    _tile_dpbssd(C, A, B);                      \
    _tile_stored(C, buf, 64);                   \
  } while (0)

// 16 rows (from m0; those past M are computed from padding and not stored) x one tile of
// 16 output columns. wt: signed_tile's groups; sc: the tile's scales.
template <typename T, int BITS>
void amx_rows16(const int8_t* xq, const Act* act, int64_t K, int64_t G, const int8_t* wt,
                const void* sc, int64_t rows, T* y, int64_t y_stride) {
  alignas(64) int32_t sums[2][16 * 16];
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i top = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  TM_GROUP_SUMS(0, 2, 4, 0, sums[0]);
  for (int64_t g = 0; g < G; ++g) {
    const int b = int(g & 1);
    if (g + 1 < G) {  // the next group's products while this one's float work runs
      if (b) TM_GROUP_SUMS(0, 2, 4, g + 1, sums[0]);
      else TM_GROUP_SUMS(1, 3, 5, g + 1, sums[1]);
    }
    const int32_t* t = sums[b];
    if constexpr (BITS == 4) {
      const __m512i szv = _mm512_loadu_si512(static_cast<const uint16_t*>(sc) + g * 2 * TN);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(szv, 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(szv, top));
      for (int r = 0; r < 16; ++r) {
        const Act& p = act[r * G + g];
        const __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(t + 16 * r));
        acc[r] = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(p.d)), acc[r]);
        acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(p.dsum), acc[r]);
      }
    } else {
      const __m512 d = _mm512_loadu_ps(static_cast<const float*>(sc) + g * TN);
      for (int r = 0; r < 16; ++r) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(t + 16 * r));
        acc[r] = _mm512_fmadd_ps(f, _mm512_mul_ps(d, _mm512_set1_ps(act[r * G + g].d)), acc[r]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    alignas(64) float out[TN];
    _mm512_store_ps(out, acc[r]);
    for (int64_t c = 0; c < TN; ++c) from_float(y + r * y_stride + c, out[c]);
  }
}

// quant_matmul's tile path: items (chunk of MC rows, tile), each making its tile's weights
// signed once for its chunk's 16-row blocks.
template <typename T, int BITS>
void amx_matmul(const int8_t* xq, const Act* act, int64_t M, int64_t K, const uint8_t* w,
                const void* sc, int64_t N, T* y, int64_t y_stride, int threads) {
  const int64_t G = K / GS, tiles = N / TN, chunks = (M + MC - 1) / MC;
  constexpr int64_t tile_bytes = BITS == 4 ? WB : WB8;
#pragma omp parallel num_threads(threads)
  {
    configure_tiles();
    struct alignas(64) Line { int8_t b[64]; };
    thread_local std::vector<Line> wbuf;  // 8 lines a group
    if (wbuf.size() < size_t(G * 8)) wbuf.resize(size_t(G * 8));
    int8_t* wt = reinterpret_cast<int8_t*>(wbuf.data());
#pragma omp for schedule(guided)
    for (int64_t item = 0; item < chunks * tiles; ++item) {
      const int64_t t = item % tiles, c = item / tiles;
      signed_tile<BITS>(w + t * G * tile_bytes, G, wt);
      const void* st = static_cast<const char*>(sc) + t * G * 4 * TN;
      for (int64_t m0 = c * MC; m0 < std::min(M, c * MC + MC); m0 += 16)
        amx_rows16<T, BITS>(xq + m0 * K, act + m0 * G, K, G, wt, st,
                            std::min<int64_t>(16, M - m0), y + m0 * y_stride + t * TN,
                            y_stride);
    }
    _tile_release();
  }
}

}  // namespace tmk::w4a8
#endif  // TM_W4A8_AMX
