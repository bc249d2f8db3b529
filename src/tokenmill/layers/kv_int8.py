"""The int8 KV cache (`--kv-cache-dtype int8`) in torch: its shape, a writer and a
dequantizing gather, byte for byte the layout of kernels/csrc/kv8.h (described there).

Rows are quantized per group of 32 dims as llama.cpp's q8_0 KV cache: half the bytes of
bfloat16 plus a float32 scale per group (18 bytes per 16 values). A layer's cache is one int8
tensor [2, Hk, n_blocks, block_bytes]: the native CPU kernels and the Triton kernel
(layers/triton_attention.py) read it, the CPU kernels write it; this module writes it
elsewhere, gathers it for the torch fallback, and is the tests' reference.
"""

from __future__ import annotations

import torch

SUB, GROUP = 16, 32  # keys per sub-block, dims per scale


def unsupported(head_dim: int, block_size: int) -> str | None:
    """Why an int8 cache cannot serve this model, or None. (On CUDA the Triton kernel reads
    it, dequantizing as it loads; the torch fallback dequantizes as it gathers.)"""
    if head_dim % GROUP:
        return f"--kv-cache-dtype int8 needs a head dim that is a multiple of {GROUP}, " \
               f"not {head_dim}"
    if block_size % SUB:
        return f"--kv-cache-dtype int8 needs a block size that is a multiple of {SUB}, " \
               f"not {block_size}"
    return None


def block_bytes(block_size: int, head_dim: int) -> int:
    return block_size // SUB * 18 * head_dim


def block_size_of(cache: torch.Tensor, head_dim: int) -> int:
    """The block size of a layer's int8 cache [2, Hk, n_blocks, block_bytes]."""
    return cache.shape[-1] // (18 * head_dim) * SUB


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q int8 [..., D], d float32 [..., D / 32]) with x ~= q * d per group:
    d = max|x| / 127, q = round-half-even(x * (1 / d)), the float32 operations of kv8.h."""
    xf = x.float().unflatten(-1, (-1, GROUP))
    d = xf.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round((xf * inv[..., None]).clamp(-127, 127)).to(torch.int8)
    return q.flatten(-2), d


def _views(half: torch.Tensor, head_dim: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One half (K or V) [Hk, n_blocks, block_bytes] as sub-blocks: K bytes
    [Hk, n, D/4, 16, 4] (uint8), V bytes [Hk, n, 16, D] (int8), scales [Hk, n, D/32, 16]."""
    hk, d = half.shape[0], head_dim
    sub = half.view(hk, -1, 18 * d)  # a view: write() stores through it
    n = sub.shape[1]
    k = sub[..., :SUB * d].view(torch.uint8).view(hk, n, d // 4, SUB, 4)
    v = sub[..., :SUB * d].view(hk, n, SUB, d)
    scales = sub[..., SUB * d:].view(torch.float32).view(hk, n, d // GROUP, SUB)
    return k, v, scales


def write(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k/v [T, Hk, D] quantized into their slots of a layer's cache [2, Hk, n_blocks, bytes]."""
    d = k.shape[-1]
    sb, u = slots // SUB, slots % SUB  # sub-blocks are SUB slots each, in slot order
    kq, kd = quantize(k)
    vq, vd = quantize(v)
    kb, _, ks = _views(cache[0], d)
    _, vb, vs = _views(cache[1], d)
    kb[:, sb, :, u, :] = (kq.to(torch.int16) + 128).to(torch.uint8).unflatten(-1, (-1, 4))
    ks[:, sb, :, u] = kd
    vb[:, sb, u, :] = vq.transpose(0, 1)
    vs[:, sb, :, u] = vd


def gather(cache: torch.Tensor, tables: torch.Tensor, head_dim: int, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's cache [2, Hk, n_blocks, bytes] and block tables [B, max_blocks] -> K and V
    [Hk, B, max_blocks * block_size, D] dequantized to `dtype` (as `_gather` in attention.py)."""
    hk, d, b = cache.shape[1], head_dim, tables.shape[0]
    blocks = cache.index_select(2, tables.reshape(-1))
    kb, _, ks = _views(blocks[0], d)
    _, vb, vs = _views(blocks[1], d)
    kq = (kb.to(torch.int16) - 128).permute(0, 1, 3, 2, 4).reshape(hk, -1, SUB, d)

    def dequant(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        s = scales.transpose(-1, -2).repeat_interleave(GROUP, -1)  # [Hk, n, 16, D]
        return (q.float() * s).to(dtype).view(hk, b, -1, d)

    return dequant(kq, ks), dequant(vb, vs)
