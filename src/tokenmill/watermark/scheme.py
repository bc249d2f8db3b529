"""Kirchenbauer et al. watermark ("A Watermark for Large Language Models", ICML 2023): the
green-list test and the detector's z-score. Pure Python (no torch, no model): the runner's
vectorized bias (`runner/watermark.py`) and `tokenmill watermark detect` share this definition.

Green list. TGI seeds a torch RNG with ``15485863 * previous token id``, permutes the vocabulary
and calls the first ``gamma * |V|`` ids green. A permutation is costly to rebuild on every step
and ties the list to torch's RNG on one device type, so we use the paper's hash variant
instead: token ``t`` is green after ``prev`` when a 64-bit hash of (key, prev, t) falls in the
lowest ``gamma`` fraction of its range. Each id is green with probability ``gamma``
independently, the whole ``[rows, V]`` mask is a handful of integer tensor ops, and the
detector tests one token in O(1) without the vocabulary size. The hash is SplitMix64 (the
sampler's counter RNG): ``prev_key(prev)`` is the stream key of a previous token, and the
token id is the counter, ``mix64(key + (t + 1) * golden)``; its top 23 bits are compared with
``green_threshold(gamma)``, so the runner and the detector agree bit for bit.

Detection (the paper's one-proportion z-test): with T scored tokens of which G are green,
``z = (G - gamma T) / sqrt(T gamma (1 - gamma))``. Each token after the first is scored against
its predecessor. By default a repeated (prev, token) pair is scored once, as the paper
suggests: repetitive text (a loop the model fell into) otherwise counts the same coin flip many
times and can push an unwatermarked text's z far from 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.splitmix import GOLDEN, mix64

__all__ = [
    "HASH_KEY",
    "WatermarkScore",
    "effective_gamma",
    "green_bits",
    "green_threshold",
    "is_green",
    "prev_key",
    "score_tokens",
]

HASH_KEY = 15485863  # TGI's hash_key (the millionth prime), multiplied by the previous token
GREEN_BITS = 23  # bits of the hash compared with the threshold (as the sampler's uniforms)

_SALT = 0x2545F4914F6CDD1D  # keeps these keys apart from the sampler's (seed, step) keys


def prev_key(prev: int) -> int:
    """The hash stream key of one previous token id, as a signed int64 value (torch's int64)."""
    k = mix64(mix64(HASH_KEY * prev + _SALT))
    return k - (1 << 64) if k >= (1 << 63) else k


def green_bits(prev: int, token: int) -> int:
    """The top GREEN_BITS bits of the hash of (prev, token): uniform in [0, 2**GREEN_BITS)."""
    return mix64(prev_key(prev) + (token + 1) * GOLDEN) >> (64 - GREEN_BITS)


def green_threshold(gamma: float) -> int:
    """``token`` is green after ``prev`` iff ``green_bits(prev, token) < green_threshold(gamma)``.

    Clamped to [1, 2**GREEN_BITS - 1] so that both lists are never empty.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"watermark gamma must be > 0 and < 1, got {gamma}")
    return min(max(round(gamma * (1 << GREEN_BITS)), 1), (1 << GREEN_BITS) - 1)


def effective_gamma(gamma: float) -> float:
    """The exact green probability after rounding gamma to the hash's resolution."""
    return green_threshold(gamma) / (1 << GREEN_BITS)


def is_green(prev: int, token: int, gamma: float) -> bool:
    return green_bits(prev, token) < green_threshold(gamma)


@dataclass(frozen=True, slots=True)
class WatermarkScore:
    num_tokens: int  # tokens in the text
    num_scored: int  # tokens tested (after the first; repeated bigrams once unless counted)
    num_green: int
    gamma: float  # the effective gamma the test used
    z: float  # 0.0 when nothing was scored

    @property
    def green_fraction(self) -> float:
        return self.num_green / self.num_scored if self.num_scored else 0.0

    @property
    def p_value(self) -> float:
        """One-sided: the chance of a z this large in unwatermarked text (normal approximation)."""
        return 0.5 * math.erfc(self.z / math.sqrt(2.0))


def z_score(num_green: int, num_scored: int, gamma: float) -> float:
    if num_scored == 0:
        return 0.0
    return (num_green - gamma * num_scored) / math.sqrt(num_scored * gamma * (1.0 - gamma))


def score_tokens(token_ids: Sequence[int], gamma: float = 0.5, *,
                 ignore_repeated_bigrams: bool = True) -> WatermarkScore:
    """Score a token sequence: each token is tested against its predecessor."""
    thresh = green_threshold(gamma)
    g = effective_gamma(gamma)
    seen: set[tuple[int, int]] = set()
    scored = green = 0
    for prev, tok in itertools.pairwise(token_ids):
        if ignore_repeated_bigrams:
            if (prev, tok) in seen:
                continue
            seen.add((prev, tok))
        scored += 1
        green += green_bits(prev, tok) < thresh
    return WatermarkScore(num_tokens=len(token_ids), num_scored=scored, num_green=green,
                          gamma=g, z=z_score(green, scored, g))
