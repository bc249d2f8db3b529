"""Counter-based randomness for the sampler (SplitMix64 in int64 tensor ops).

The uniform for vocab column ``v`` of a row is a pure function of ``(seed, step, v)``, with
``step = len(output_token_ids)``: a request draws the same token whatever else is in the
batch, wherever its row is, and on any device, with no ``torch.Generator`` state to carry
between steps. Python ints for the per-row key, int64 tensors per element.
"""

from __future__ import annotations

import torch

from tokenmill.splitmix import GOLDEN, MIX1, MIX2, mix64, to_int64

__all__ = ["column_counters", "counter_uniform", "row_key"]

_SEED_SALT = 0x5851F42D4C957F2D
_UNIFORM_BITS = 23  # (2m + 1) / 2**24 is exact in float32 for m < 2**23, and never 0 or 1


def row_key(seed: int, step: int) -> int:
    """The 64-bit stream key (as a signed int64 value) of one request at one decode step.

    For a fixed seed, different steps give different keys (the mixer is a bijection), and
    likewise for a fixed step and different seeds.
    """
    return to_int64(mix64(mix64(seed ^ _SEED_SALT) + (step + 1) * GOLDEN))


def column_counters(vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(v + 1) * golden mod 2**64`` for every column, as int64: the SplitMix64 counters."""
    v = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=device)
    return v.mul_(to_int64(GOLDEN))  # int64 multiplication wraps mod 2**64


def counter_uniform(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float32 ``[B, V]``: element (b, v) = splitmix64(keys[b] + counters[v]).

    Only integer ops: ``>>`` on int64 is arithmetic, so each shift is masked to make it
    logical; multiplication wraps mod 2**64. The final xor-shift of SplitMix64 is skipped
    because it does not touch the top 23 bits, which are the ones used.
    """
    x = keys[:, None] + counters[None, :]
    t = torch.empty_like(x)
    torch.bitwise_right_shift(x, 30, out=t)
    x.bitwise_xor_(t.bitwise_and_((1 << 34) - 1))
    x.mul_(to_int64(MIX1))
    torch.bitwise_right_shift(x, 27, out=t)
    x.bitwise_xor_(t.bitwise_and_((1 << 37) - 1))
    x.mul_(to_int64(MIX2))
    x.bitwise_right_shift_(64 - _UNIFORM_BITS).bitwise_and_((1 << _UNIFORM_BITS) - 1)
    u = x.to(torch.float32)
    return u.mul_(2.0 ** -_UNIFORM_BITS).add_(2.0 ** -(_UNIFORM_BITS + 1))
