// The paged KV cache as attention.cpp's work items see it: one item's keys, and the
// software prefetch of the next item's blocks. Included by attention.cpp and attn_kv8.h only.
#pragma once
#include <cstdint>

namespace tmk::attn {

// The paged-cache view of one work item: a row's keys [start, end) under KV head h.
template <typename E>
struct Item {
  const int64_t* table;  // the row's sequence's block ids
  const E* kh;           // K and V caches of head h, n_blocks blocks
  const E* vh;
  int64_t start, end;
};

// Software prefetch of the next item's K and V blocks into L2, issued while the current item
// computes: its K a block per call while the scores run, its V a block per call while the
// weighted sum does, so the requests are spread over the whole item instead of bunched (which
// filled the miss queues: the hardware prefetcher does not follow 2 KB blocks, scattered or
// not). 64 decode rows x 192 keys over 30 layers' caches (benchmarks/cpu_kernels.py), int8
// cache: ~360 -> ~220 us a layer with contiguous blocks and ~290 scattered (~180 when the
// cache is warm); before any prefetch the bfloat16 cache took ~650 scattered.
template <typename E>
struct Prefetch {
  Item<E> it{};
  int64_t k = 0, v = 0, last = -1, block_bytes = 0;  // the next K and V blocks to fetch
  void reset(const Item<E>& next, int64_t bs, int64_t block_elems) {
    it = next;
    k = v = next.start / bs;
    last = next.end > next.start ? (next.end - 1) / bs : -1;
    block_bytes = block_elems * int64_t(sizeof(E));
  }
  void step(bool value) {
    int64_t& b = value ? v : k;
    if (b > last) return;
    const char* h = reinterpret_cast<const char*>(value ? it.vh : it.kh);
    h += it.table[b++] * block_bytes;
    for (int64_t o = 0; o < block_bytes; o += 64) __builtin_prefetch(h + o, 0, 2);
  }
  void finish() {  // whatever the loops did not reach
    while (k <= last) step(false);
    while (v <= last) step(true);
  }
};

}  // namespace tmk::attn
