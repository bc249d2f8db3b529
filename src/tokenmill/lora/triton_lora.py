"""Triton kernels for the batched LoRA product on CUDA (Punica's SGMV "shrink" / "expand").

`lora_add_triton_` computes what `punica.lora_add_` computes, in two launches:
- shrink: h[i] = A_s @ x[rows[i]] for every planned row i, h [N, R] in float32, the reduction
  over `in` optionally split into `split_k` partial sums h [split_k, N, R];
- expand: y[rows[i]] += B_s @ sum_k h[k, i], accumulated in float32 and stored in y's dtype.

`make_plan` cuts each slot's run of rows (its segment) into blocks of `plan.token_block` rows
and lists them in `plan.blocks` [n_blocks, 3] int32 = (slot, first row, end of the segment),
both as offsets into `plan.rows`. A program owns one such block, so it reads its adapter's A / B
tiles once for up to `token_block` tokens (prefill), and a block never mixes adapters, so no
per-token weight gather is needed (decode: one short block per adapter). The grid size is the
host-known block count, so nothing here waits on the device.

triton is optional (it is not a project dependency): it is imported only when a kernel is first
needed, and `kernels.triton_support.triton_available()` says whether it can be.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenmill.lora.punica import LoraPlan

# Tile sizes. tl.dot wants every dimension >= 16; the rank tile covers the usual fused ranks
# (3 * 16 = 48 -> 64) in one step and loops beyond that.
BLOCK_K = 64  # shrink: slice of `in` reduced per step
BLOCK_N = 64  # expand: columns of y per program
MAX_BLOCK_R = 64
# Split-K for the shrink: a decode step has few token blocks, so without it a handful of
# programs would each walk all of `in` (e.g. 4096) while most SMs idle. Partials go to separate
# h planes that expand sums (no atomics: deterministic for a given batch).
MIN_K_PER_SPLIT = 512
MAX_SPLIT_K = 8
TARGET_PROGRAMS = 128  # about one wave on an H100 (132 SMs)

# triton.language, bound by `_kernels()`: triton resolves `tl` in a kernel's module globals (the
# interpreter patches it there), so it cannot be a local of the function that defines them.
tl: Any = None


@functools.cache
def _kernels() -> tuple[Any, Any, bool]:
    """The jitted (shrink, expand) kernels, and whether triton's CPU interpreter runs them."""
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, h_ptr, rows_ptr, blocks_ptr, R, K, SPLIT_K,
               sxt, sxk, sas, sar, sak, shs, sht, shr,
               BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_b = tl.program_id(0)
        slot = tl.load(blocks_ptr + pid_b * 3).to(tl.int64)
        start = tl.load(blocks_ptr + pid_b * 3 + 1)
        end = tl.load(blocks_ptr + pid_b * 3 + 2)
        offs_t = start + tl.arange(0, BLOCK_T)  # positions in `rows` (and rows of h)
        mask_t = offs_t < end
        rows = tl.load(rows_ptr + offs_t, mask=mask_t, other=0)  # int64: no offset overflow
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        pid_k = tl.program_id(2)  # this program reduces chunks pid_k, pid_k + SPLIT_K, ...
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * sxt + (pid_k * BLOCK_K + offs_k[None, :]) * sxk
        # A_s is [R, in]; load it transposed as a [BLOCK_K, BLOCK_R] tile.
        a_ptrs = (a_ptr + slot * sas + offs_r[None, :] * sar
                  + (pid_k * BLOCK_K + offs_k[:, None]) * sak)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            mask_k = offs_k < K - k
            xt = tl.load(x_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(xt.dtype)
            if UPCAST:
                xt, at = xt.to(tl.float32), at.to(tl.float32)
            acc = tl.dot(xt, at, acc, input_precision=PRECISION)
            x_ptrs += SPLIT_K * BLOCK_K * sxk
            a_ptrs += SPLIT_K * BLOCK_K * sak
        h_ptrs = h_ptr + pid_k * shs + offs_t[:, None] * sht + offs_r[None, :] * shr
        tl.store(h_ptrs, acc, mask=mask_t[:, None] & mask_r[None, :])

    @triton.jit
    def expand(h_ptr, b_ptr, y_ptr, rows_ptr, blocks_ptr, R, N, SPLIT_K,
               shs, sht, shr, sbs, sbn, sbr, syt, syn,
               BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_b = tl.program_id(0)
        slot = tl.load(blocks_ptr + pid_b * 3).to(tl.int64)
        start = tl.load(blocks_ptr + pid_b * 3 + 1)
        end = tl.load(blocks_ptr + pid_b * 3 + 2)
        offs_t = start + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        rows = tl.load(rows_ptr + offs_t, mask=mask_t, other=0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        h_ptrs = h_ptr + offs_t[:, None] * sht + offs_r[None, :] * shr
        # B_s is [out, R]; load it transposed as a [BLOCK_R, BLOCK_N] tile.
        b_ptrs = b_ptr + slot * sbs + offs_r[:, None] * sbr + offs_n[None, :] * sbn
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r in range(0, tl.cdiv(R, BLOCK_R)):
            mask_r = offs_r < R - r * BLOCK_R
            mask_h = mask_t[:, None] & mask_r[None, :]
            ht = tl.load(h_ptrs, mask=mask_h, other=0.0)
            for k in range(1, SPLIT_K):  # the shrink's partial sums
                ht += tl.load(h_ptrs + k * shs, mask=mask_h, other=0.0)
            bt = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            # h rounded to the weights' dtype, as the torch path's bf16 matmul chain does.
            ht = ht.to(bt.dtype)
            if UPCAST:
                ht, bt = ht.to(tl.float32), bt.to(tl.float32)
            acc = tl.dot(ht, bt, acc, input_precision=PRECISION)
            h_ptrs += BLOCK_R * shr
            b_ptrs += BLOCK_R * sbr
        # Each row appears once in `rows`, so this read-modify-write has no race.
        y_ptrs = y_ptr + rows[:, None] * syt + offs_n[None, :] * syn
        mask = mask_t[:, None] & mask_n[None, :]
        yt = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (yt + acc).to(y_ptr.dtype.element_ty), mask=mask)

    # triton picks the interpreter (TRITON_INTERPRET=1) when it decorates a kernel.
    return shrink, expand, type(shrink).__name__ == "InterpretedFunction"


def _block_r(rank: int) -> int:
    return min(MAX_BLOCK_R, max(16, 1 << (rank - 1).bit_length()))  # next power of two


def _split_k(fan_in: int, programs: int) -> int:
    return max(1, min(MAX_SPLIT_K, fan_in // MIN_K_PER_SPLIT, TARGET_PROGRAMS // programs))


def lora_add_triton_(y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, a_stack: torch.Tensor,
                     b_stack: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
    """y[t] += B_s @ (A_s @ x[t]) for the planned rows, in place (as `punica.lora_add_`).

    x [T, in], y [T, out], a_stack [S, R, in], b_stack [S, out, R]; any float dtype, float32
    accumulation. Needs a plan made with the Triton metadata (`plan.blocks`). `split_k`
    overrides the shrink's split of `in` (tests)."""
    if plan.blocks is None:
        raise ValueError("lora_add_triton_: the plan has no Triton block metadata")
    n_rows, n_blocks = plan.rows.shape[0], plan.blocks.shape[0]
    rank, fan_in, fan_out = a_stack.shape[1], x.shape[1], y.shape[1]
    if a_stack.shape[2] != fan_in or b_stack.shape[1:] != (fan_out, rank):
        raise ValueError(f"lora_add_triton_: x {tuple(x.shape)}, y {tuple(y.shape)}, "
                         f"A {tuple(a_stack.shape)}, B {tuple(b_stack.shape)} do not fit")
    shrink, expand, interpreted = _kernels()
    # Mirror torch's matmul setting: fp32 inputs use TF32 only where torch would too.
    precision = ("tf32" if x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
                 else "ieee")
    # triton's interpreter multiplies bf16 operands of tl.dot as raw bits (triton #11584: bf16
    # is unsupported there), so it gets fp32 copies of the bf16 values; compiled kernels never do.
    upcast = interpreted and torch.bfloat16 in (x.dtype, a_stack.dtype, b_stack.dtype)
    block_t, block_r = plan.token_block, _block_r(rank)
    r_tiles = -(-rank // block_r)
    split_k = split_k or _split_k(fan_in, n_blocks * r_tiles)
    h = torch.empty(split_k, n_rows, rank, dtype=torch.float32, device=x.device)
    shrink[(n_blocks, r_tiles, split_k)](
        x, a_stack, h, plan.rows, plan.blocks, rank, fan_in, split_k,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        h.stride(0), h.stride(1), h.stride(2),
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=BLOCK_K, PRECISION=precision,
        UPCAST=upcast)
    expand[(n_blocks, -(-fan_out // BLOCK_N))](
        h, b_stack, y, plan.rows, plan.blocks, rank, fan_out, split_k,
        h.stride(0), h.stride(1), h.stride(2), b_stack.stride(0), b_stack.stride(1),
        b_stack.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=BLOCK_N, PRECISION=precision,
        UPCAST=upcast)
    return y
