"""The watermark's logits step: add delta to the green ids of watermarked rows.

The green test is `tokenmill.watermark`'s, computed for a whole ``[rows, V]`` block with int64
tensor ops (bit-identical to the pure-Python `green_bits`). The sampler runs it after the
penalties and before temperature and the filters, where TGI runs its watermark processor.
"""

from __future__ import annotations

import torch

from tokenmill.watermark import GREEN_BITS, green_threshold, prev_key

__all__ = ["WatermarkBias", "green_mask"]

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # SplitMix64 multipliers as signed int64 values
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def green_mask(keys: torch.Tensor, counters: torch.Tensor, threshold: int) -> torch.Tensor:
    """bool ``[n, V]``: element (r, v) = green_bits(prev of row r, v) < threshold.

    ``keys``: ``[n]`` int64 from `prev_key`; ``counters``: ``(v + 1) * golden`` per column (the
    sampler's `column_counters`). ``>>`` on int64 is arithmetic, so each shift is masked to be
    logical; multiplication wraps mod 2**64. SplitMix64's last xor-shift does not touch the top
    bits, so it is skipped.
    """
    x = keys[:, None] + counters[None, :]
    t = torch.empty_like(x)
    torch.bitwise_right_shift(x, 30, out=t)
    x.bitwise_xor_(t.bitwise_and_((1 << 34) - 1))
    x.mul_(_MIX1)
    torch.bitwise_right_shift(x, 27, out=t)
    x.bitwise_xor_(t.bitwise_and_((1 << 37) - 1))
    x.mul_(_MIX2)
    x.bitwise_right_shift_(64 - GREEN_BITS).bitwise_and_((1 << GREEN_BITS) - 1)
    return x < threshold


class WatermarkBias:
    """gamma and delta of the server (TGI's --watermark-gamma / --watermark-delta)."""

    #: rows are hashed this many elements at a time (two int64 temporaries per element).
    chunk_elems: int = 1 << 22

    def __init__(self, gamma: float = 0.5, delta: float = 2.0) -> None:
        if not delta >= 0.0 or delta == float("inf"):
            raise ValueError(f"watermark delta must be >= 0 and finite, got {delta}")
        self.gamma = gamma
        self.delta = delta
        self.threshold = green_threshold(gamma)

    @staticmethod
    def keys(prev_ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor([prev_key(p) for p in prev_ids], dtype=torch.int64, device=device)

    def apply(self, x: torch.Tensor, rows: torch.Tensor | None, keys: torch.Tensor,
              counters: torch.Tensor) -> None:
        """x[rows[i]] += delta on the green ids after row i's previous token, in place.

        ``rows``: batch rows of the watermarked subset (``None``: every row). Other rows are
        not touched at all.
        """
        n = keys.shape[0]
        step = max(1, self.chunk_elems // max(1, x.shape[1]))
        for r in range(0, n, step):
            bias = green_mask(keys[r:r + step], counters, self.threshold).to(x.dtype)
            bias.mul_(self.delta)
            if rows is None:
                x[r:r + step].add_(bias)
            else:
                x.index_add_(0, rows[r:r + step], bias)
