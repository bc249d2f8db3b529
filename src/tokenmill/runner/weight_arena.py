"""The native CPU kernels' weights in 2 MB pages.

A decode step streams every weight once: for SmolLM2's w4a8 model ~96 MB, some 24,000 pages
of 4 KB, more than the CPU's TLB holds (Zen 4: 3,072 entries), so each step walks the page
tables again for every page it reads. Linux backs an anonymous mapping with 2 MB pages when
transparent huge pages are enabled for it (`madvise` mode: MADV_HUGEPAGE), so the weights the
native matmuls read (w4a8/w8a8 packed bytes and scales, dense tiles) are copied once, at load,
into one such mapping. Same bytes, same kernels, same results; only where they live changes.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import torch
from torch import nn

from tokenmill.layers.dense import TiledWeight
from tokenmill.layers.linear import Linear
from tokenmill.layers.quant import NativeQuantWeight

logger = logging.getLogger("tokenmill.loading")

HUGE_PAGE = 1 << 21
ALIGN = 64  # each tensor starts on a cache line
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Kernels with multi-size THP (6.8+) also set each size on its own: `inherit` follows the
# line above, `never` turns 2 MB pages off whatever it says.
THP_2MB_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/enabled")


def huge_pages_available() -> bool:
    """Whether a MADV_HUGEPAGE mapping can get 2 MB pages here: Linux with transparent huge
    pages in `always` or `madvise` mode, and the 2 MB size not turned off on its own."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        if "[never]" in THP_ENABLED.read_text():
            return False
    except OSError:
        return False
    try:
        return "[never]" not in THP_2MB_ENABLED.read_text()
    except OSError:  # no per-size settings: the line above decides
        return True


def native_weight_buffers(model: nn.Module) -> list[tuple[object, str]]:
    """(owner, attribute) of every tensor the native matmuls stream: the packed bytes and
    scales of w4a8/w8a8 layers and the tiles of dense ones."""
    out: list[tuple[object, str]] = []
    for m in model.modules():
        if not isinstance(m, Linear):
            continue
        if isinstance(m.quant, NativeQuantWeight):
            out += [(m.quant, "packed"), (m.quant, "scales")]
        elif isinstance(m.packed, TiledWeight):
            out.append((m.packed, "tiles"))
    return out


def place_in_arena(buffers: list[tuple[object, str]]) -> mmap.mmap | None:
    """Copies each tensor into one 2 MB-aligned anonymous mapping advised MADV_HUGEPAGE and
    rebinds the attribute to the copy (the tensors keep the mapping alive). Returns the
    mapping, or None when there is nothing to place or huge pages are unavailable."""
    tensors = [getattr(owner, name) for owner, name in buffers]
    if not tensors or not huge_pages_available():
        return None
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        raise ValueError("place_in_arena: CPU tensors in contiguous layout only")
    sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
    total = -(-sum(sizes) // HUGE_PAGE) * HUGE_PAGE
    # One huge page more: mmap aligns to 4 KB, the arena starts at the next 2 MB boundary
    # (the untouched head never becomes resident).
    arena = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(arena, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    arena.madvise(mmap.MADV_HUGEPAGE, start, total)
    off = start
    for (owner, name), t, size in zip(buffers, tensors, sizes):
        nbytes = t.numel() * t.element_size()
        copy = raw[off:off + nbytes].view(t.dtype).view(t.shape)
        copy.copy_(t)
        setattr(owner, name, copy)
        off += size
    return arena


def weights_in_huge_pages(model: nn.Module) -> int:
    """`place_in_arena` for the model's native weights (after `prepare_cpu_weights`, before
    the fused stack takes their addresses); returns the bytes placed (0: none)."""
    buffers = native_weight_buffers(model)
    if place_in_arena(buffers) is None:
        return 0
    placed = sum(t.numel() * t.element_size() for t in (getattr(o, a) for o, a in buffers))
    logger.info("CPU weights: %.0f MB in 2 MB pages", placed / 2**20)
    return placed
