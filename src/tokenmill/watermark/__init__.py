"""Kirchenbauer watermark: the green-list test and the detector (`scheme.py`, pure Python), and
the `tokenmill watermark detect` command (`cli.py`). The runner's bias is `runner/watermark.py`."""

from tokenmill.watermark.scheme import (
    GREEN_BITS,
    HASH_KEY,
    WatermarkScore,
    effective_gamma,
    green_bits,
    green_threshold,
    is_green,
    prev_key,
    score_tokens,
    z_score,
)

__all__ = [
    "GREEN_BITS",
    "HASH_KEY",
    "WatermarkScore",
    "effective_gamma",
    "green_bits",
    "green_threshold",
    "is_green",
    "prev_key",
    "score_tokens",
    "z_score",
]
