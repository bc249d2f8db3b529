// What bounds the w4a8 matmul's inner loop (benchmarks/w4a8_bound.py builds and runs this).
// The production tile loop (src/tokenmill/kernels/csrc/w4a8.cpp, included below) against the
// same loop with parts of its per-group float epilogue removed, one thread, warm caches:
//   full      8 vpdpbusd + add, cvt, mul (s * d), fma (scale), fma (z term): the kernel;
//   no-z      the z-term fma left out (wrong results: timing only);
//   int-only  the 8 vpdpbusd and the add, integer sums kept: no float work at all.
// If the loop were bound by loads or by the vpdpbusd alone, the variants would run as fast as
// the kernel; each float op they drop shows up as speed when the multiply pipes are the limit.
#include "../../src/tokenmill/kernels/csrc/w4a8.cpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>

#if !TM_W4A8_VNNI
int main() {
  std::puts("no AVX-512 VNNI on this build: nothing to measure");
  return 0;
}
#else
namespace {

enum Variant { FULL, NO_Z, INT_ONLY };

template <Variant V, int NR>
void tile_variant(const uint8_t* w, const uint16_t* sz, int64_t G, const int8_t* xq,
                  const Act* act, int64_t K, float* y, int64_t y_stride) {
  if constexpr (V == FULL) {
    tile_rows<float, NR>(w, sz, G, xq, act, K, y, y_stride, nullptr, nullptr);
  } else {
    __m512 acc[NR];
    __m512i iacc[NR];
    for (int m = 0; m < NR; ++m) acc[m] = _mm512_setzero_ps(), iacc[m] = _mm512_setzero_si512();
    const __m512i nib = _mm512_set1_epi8(0x0F);
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = w + g * WB;
      __m512i lo[4], hi[4];
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(wg + 64 * j);
        lo[j] = _mm512_and_si512(v, nib);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      }
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(sz + g * 2 * TN), 16));
      for (int m = 0; m < NR; ++m) {
        const int8_t* a = xq + m * K + g * GS;
        const Act& p = act[m * G + g];
        __m512i t0 = _mm512_set1_epi32(p.corr), t1 = _mm512_setzero_si512();
        for (int j = 0; j < 4; ++j) {
          t0 = _mm512_dpbusd_epi32(t0, lo[j], _mm512_set1_epi32(quad(a + 4 * j)));
          t1 = _mm512_dpbusd_epi32(t1, hi[j], _mm512_set1_epi32(quad(a + 16 + 4 * j)));
        }
        if constexpr (V == INT_ONLY) {
          iacc[m] = _mm512_add_epi32(iacc[m], _mm512_add_epi32(t0, t1));
        } else {
          const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1));
          acc[m] = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(p.d)), acc[m]);
        }
      }
    }
    for (int m = 0; m < NR; ++m)
      _mm512_storeu_ps(y + m * y_stride,
                       _mm512_add_ps(acc[m], _mm512_cvtepi32_ps(iacc[m])));
  }
}

template <Variant V>
double gmacs(int64_t K, int64_t N, int reps) {
  constexpr int NR = int(MB);
  const int64_t G = K / GS, tiles = N / TN;
  std::vector<uint8_t> w(size_t(tiles * G * WB));
  std::vector<uint16_t> sz(size_t(tiles * G * 2 * TN));
  std::vector<int8_t> xq(size_t(NR * K));
  std::vector<Act> act(size_t(NR * G));
  std::vector<float> y(size_t(NR * N));
  uint32_t r = 12345;
  auto next = [&r] { return r = r * 1664525u + 1013904223u; };
  for (auto& b : w) b = uint8_t(next() >> 24);
  for (auto& v : sz) v = uint16_t(0x3c00 + (next() >> 28));  // small positive bfloat16
  for (auto& v : xq) v = int8_t(std::max(-127, int(next() >> 24) - 128));  // as quantized
  for (auto& a : act) set_act(a, 0.01f, int32_t(next() >> 26) - 32);
  auto run = [&] {
    for (int64_t t = 0; t < tiles; ++t)
      tile_variant<V, NR>(w.data() + t * G * WB, sz.data() + t * G * 2 * TN, G, xq.data(),
                          act.data(), K, y.data() + t * TN, N);
  };
  for (int i = 0; i < 20; ++i) run();
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) run();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return double(reps) * NR * K * N / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 400;
  std::printf("shape,full,no_z,int_only\n");
  for (const auto& [K, N] : {std::pair<int64_t, int64_t>{576, 256}, {1536, 256}}) {
    const double f = gmacs<FULL>(K, N, reps), nz = gmacs<NO_Z>(K, N, reps),
                 io = gmacs<INT_ONLY>(K, N, reps);
    std::printf("K=%ld N=%ld,%.1f,%.1f,%.1f\n", long(K), long(N), f, nz, io);
  }
  return 0;
}
#endif
