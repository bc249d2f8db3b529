"""SplitMix64 on Python ints: the constants and the output function that the sampler's
counter RNG (`runner/sampling_rng.py`) and the watermark's hash (`watermark/scheme.py`) share.
No torch, so the watermark detector stays light."""

from __future__ import annotations

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # the increment
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def to_int64(x: int) -> int:
    """The signed int64 with the same 64 bits as ``x mod 2**64`` (torch's int64 values)."""
    x &= MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def mix64(x: int) -> int:
    """SplitMix64's output function (exact, unsigned 64-bit)."""
    x &= MASK64
    x ^= x >> 30
    x = (x * MIX1) & MASK64
    x ^= x >> 27
    x = (x * MIX2) & MASK64
    return x ^ (x >> 31)
