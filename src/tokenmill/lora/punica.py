"""Batched LoRA for mixed batches (the Punica SGMV / BGMV idea) in plain torch.

Adapters are stacked into `a_stack` [S, r_max, in] and `b_stack` [S, out, r_max]; a rank below
r_max is zero-padded, which adds exact zeros, so adapters of different ranks share a batch.
Each token carries a slot index into the stack, -1 meaning "no adapter" (its delta is zero).

Two vectorised variants, neither loops in Python over requests or tokens:
- `lora_delta_bgmv`: gathers each token's A and B and runs one bmm per factor (decode-shaped).
- `lora_delta_sgmv`: sorts tokens by slot, packs them into a [S, max_tokens_per_slot, in]
  buffer and runs one bmm per factor over the slots (prefill-shaped: weights read once).
`lora_delta` picks between them (see `_SGMV_MIN_TOKENS_PER_SLOT`).

The serving path (`LoraPlan` + `lora_add_`) is SGMV with the segment bookkeeping done once per
step on the host (`make_plan`) instead of once per projection, scales folded into B, and a
plain matmul pair when the whole batch uses one adapter. On CUDA with triton installed it runs
the Triton shrink/expand kernels of `triton_lora.py` instead (`TOKENMILL_LORA_TRITON=0`: off); on
CPU the native SGMV kernel of `kernels/csrc/lora.cpp` when it builds
(`TOKENMILL_CPU_KERNELS=0`: off). On a 2-core CPU, 8 adapters x 4 decode rows, the torch bmm
pair costs ~2x the native kernel: oneDNN's bf16 bmm runs far below its GEMM rate at 4 rows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from tokenmill.kernels.cpu import cpu_kernels, lora_chunks
from tokenmill.kernels.triton_support import triton_available
from tokenmill.lora.triton_lora import lora_add_triton_

# Measured on CPU (2 threads, fp32, in=out=576, r=16, S=8, random slots incl. -1): T=64 BGMV
# ~11.3 ms vs SGMV ~1.3 ms (BGMV copies T*(r*in + out*r) weights); T=4 BGMV ~1.1 ms vs SGMV
# ~1.5 ms; crossover near T = S. So SGMV once there are at least as many tokens as slots.
_SGMV_MIN_TOKENS_PER_SLOT = 1.0

# The native CPU kernel serves steps with at most this many tokens on one adapter (decode,
# short prefill chunks); beyond it oneDNN's bmm wins (2 cores, bf16, 576x960 at r=48: 16
# rows/slot 0.025 vs 0.053 ms, 64 rows 0.074 vs 0.085 ms, 512 rows 0.56 vs 0.29 ms).
CPU_KERNEL_MAX_ROWS_PER_SLOT = 32

# Tokens per Triton program (`LoraPlan.blocks`): one decode token per adapter wastes most of a
# 16-row tile, but 16 is the smallest tile tl.dot takes, and prefill segments fill it.
TRITON_TOKEN_BLOCK = 16


def stack_adapters(adapters: list[tuple[torch.Tensor, torch.Tensor, float]], r_max: int,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (A [r, in], B [out, r], scale) triples into zero-padded
    (a_stack [S, r_max, in], b_stack [S, out, r_max], scales [S])."""
    if not adapters:
        raise ValueError("stack_adapters: no adapters")
    a0, b0, _ = adapters[0]
    fan_in, fan_out = a0.shape[1], b0.shape[0]
    dtype, device = a0.dtype, a0.device
    a_stack = torch.zeros(len(adapters), r_max, fan_in, dtype=dtype, device=device)
    b_stack = torch.zeros(len(adapters), fan_out, r_max, dtype=dtype, device=device)
    for i, (a, b, _) in enumerate(adapters):
        r = a.shape[0]
        if r > r_max or a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise ValueError(f"stack_adapters: adapter {i} has A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}; expected ([<= {r_max}], {fan_in}) and "
                             f"({fan_out}, r)")
        a_stack[i, :r] = a
        b_stack[i, :, :r] = b
    scales = torch.tensor([s for _, _, s in adapters], dtype=dtype, device=device)
    return a_stack, b_stack, scales


def lora_delta_bgmv(x: torch.Tensor, token_slot: torch.Tensor, a_stack: torch.Tensor,
                     b_stack: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-token gathered weights: out[t] = scale_s * B_s @ (A_s @ x[t]), s = token_slot[t]."""
    valid = token_slot >= 0
    slot = token_slot.clamp(min=0)
    a = a_stack.index_select(0, slot)  # [T, r, in]
    b = b_stack.index_select(0, slot)  # [T, out, r]
    h = torch.bmm(a, x.unsqueeze(2))  # [T, r, 1]
    h = h * (scales.index_select(0, slot) * valid.to(x.dtype)).view(-1, 1, 1)
    return torch.bmm(b, h).squeeze(2)  # [T, out]


def lora_delta_sgmv(x: torch.Tensor, token_slot: torch.Tensor, a_stack: torch.Tensor,
                    b_stack: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Segment tokens by slot, pad segments to the longest one, one bmm per factor."""
    n_tokens = x.shape[0]
    n_slots = a_stack.shape[0]
    out = x.new_zeros(n_tokens, b_stack.shape[1])
    idx = torch.nonzero(token_slot >= 0).squeeze(1)
    if idx.numel() == 0:
        return out
    slots = token_slot.index_select(0, idx)
    slots_sorted, order = torch.sort(slots, stable=True)
    tok = idx.index_select(0, order)
    counts = torch.bincount(slots_sorted, minlength=n_slots)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(tok.numel(), device=x.device) - starts.index_select(0, slots_sorted)
    max_count = int(counts.max())
    # Only the slots that occur take part in the bmm.
    used = torch.nonzero(counts).squeeze(1)
    remap = torch.full((n_slots,), -1, dtype=torch.long, device=x.device)
    remap[used] = torch.arange(used.numel(), device=x.device)
    group = remap.index_select(0, slots_sorted)
    packed = x.new_zeros(used.numel(), max_count, x.shape[1])
    packed[group, pos] = x.index_select(0, tok)
    h = torch.bmm(packed, a_stack.index_select(0, used).transpose(1, 2))  # [U, M, r]
    h = h * scales.index_select(0, used).view(-1, 1, 1)
    y = torch.bmm(h, b_stack.index_select(0, used).transpose(1, 2))  # [U, M, out]
    out[tok] = y[group, pos]
    return out


def lora_delta(x: torch.Tensor, token_slot: torch.Tensor, a_stack: torch.Tensor,
               b_stack: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """scale_s * (x @ A_s^T) @ B_s^T per token, s = token_slot[t]; rows with slot -1 are zero.

    x [T, in], token_slot [T] long, a_stack [S, r_max, in], b_stack [S, out, r_max],
    scales [S] -> [T, out]."""
    if x.dim() != 2 or token_slot.shape != (x.shape[0],):
        raise ValueError(f"lora_delta: x {tuple(x.shape)} / token_slot "
                         f"{tuple(token_slot.shape)} do not fit")
    n_tokens = x.shape[0]
    if n_tokens == 0:
        return x.new_zeros(0, b_stack.shape[1])
    if n_tokens >= _SGMV_MIN_TOKENS_PER_SLOT * a_stack.shape[0]:
        return lora_delta_sgmv(x, token_slot, a_stack, b_stack, scales)
    return lora_delta_bgmv(x, token_slot, a_stack, b_stack, scales)


@dataclass(slots=True)
class LoraPlan:
    """Which token rows use which adapter slot this step; shared by every LoRA linear."""

    rows: torch.Tensor  # [N] rows that use an adapter, grouped by slot
    slots: list[int]  # the distinct slots in group order
    slot_index: torch.Tensor  # the same, as a device tensor
    # The slots are lo..hi-1 with none missing: the stacks are sliced (a view), not gathered.
    # Gathering copies every used adapter's weights each step, as many bytes as the bmm reads.
    slot_range: tuple[int, int] | None
    # Every used slot has M rows and the rows are first..first+U*M-1, grouped by slot (the
    # runner orders rows by slot): x and y are viewed as [U, M, .], nothing is gathered.
    first_row: int | None
    # Several slots otherwise: the padded [U, M] layout, M the most tokens on one slot. `gather`
    # [U * M] is the token row of each padded position (a padding position repeats its group's
    # first row, so no zero buffer is needed) and `pad` [U, M, 1] marks the padding positions,
    # whose products are zeroed before they are added back (None: no padding).
    gather: torch.Tensor | None
    pad: torch.Tensor | None
    max_count: int  # M
    identity: bool  # rows == arange(T): one slot, every token (no gather or scatter)
    # Triton path only (None: torch path). Each slot's run of `rows` cut into blocks of
    # `token_block`: [n_blocks, 3] int32 = (slot, first index into rows, end of its segment).
    blocks: torch.Tensor | None = None
    token_block: int = TRITON_TOKEN_BLOCK
    # Native CPU kernel only (None: torch path): int64 [rows | segment offsets | segment slots],
    # and a float32 scratch the kernel reuses for every linear of the step (grown on demand).
    cpu_meta: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    num_tokens: int = -1  # the step's T: a plan serves only the batch it was made for


def use_triton(device: torch.device) -> bool:
    """The Triton kernels serve CUDA devices when triton imports, unless TOKENMILL_LORA_TRITON=0."""
    return (device.type == "cuda" and os.environ.get("TOKENMILL_LORA_TRITON", "1") != "0"
            and triton_available())


def use_cpu_kernel(device: torch.device) -> bool:
    return device.type == "cpu" and cpu_kernels() is not None


def make_plan(token_slots: list[int], device: torch.device, triton: bool | None = None,
              cpu: bool | None = None) -> LoraPlan | None:
    """Group the step's tokens by slot (-1: no adapter); None when no token uses one.

    `triton` adds the Triton kernels' block table (default: `use_triton(device)`), `cpu` the
    native CPU kernel's segment table (default: `use_cpu_kernel(device)`) unless some slot has
    more than `CPU_KERNEL_MAX_ROWS_PER_SLOT` tokens."""
    groups: dict[int, list[int]] = {}
    for t, s in enumerate(token_slots):
        if s >= 0:
            groups.setdefault(s, []).append(t)
    if not groups:
        return None
    slots = sorted(groups)
    rows = [t for s in slots for t in groups[s]]
    max_count = max(len(g) for g in groups.values())
    first_row = None
    if (len(slots) > 1 and all(len(g) == max_count for g in groups.values())
            and rows == list(range(rows[0], rows[0] + len(rows)))):
        first_row = rows[0]
    gather = pad = None
    if len(slots) > 1 and first_row is None:
        gather = torch.tensor([g[min(j, len(g) - 1)] for g in (groups[s] for s in slots)
                               for j in range(max_count)], dtype=torch.long, device=device)
        if any(len(g) < max_count for g in groups.values()):
            pad = torch.tensor([[j >= len(groups[s])] for s in slots for j in range(max_count)],
                               dtype=torch.bool, device=device).view(len(slots), max_count, 1)
    blocks = None
    if use_triton(device) if triton is None else triton:
        table, start, tb = [], 0, TRITON_TOKEN_BLOCK
        for s in slots:
            end = start + len(groups[s])
            table += [(s, b, end) for b in range(start, end, tb)]
            start = end
        blocks = torch.tensor(table, dtype=torch.int32, device=device)
    cpu_meta = None
    if (use_cpu_kernel(device) if cpu is None else cpu) and (
            max_count <= CPU_KERNEL_MAX_ROWS_PER_SLOT):
        offsets = [0]
        for s in slots:
            offsets.append(offsets[-1] + len(groups[s]))
        cpu_meta = torch.tensor(rows + offsets + slots, dtype=torch.int64)
    return LoraPlan(rows=torch.tensor(rows, dtype=torch.long, device=device), slots=slots,
                    slot_index=torch.tensor(slots, dtype=torch.long, device=device),
                    slot_range=((slots[0], slots[-1] + 1)
                                if slots[-1] - slots[0] + 1 == len(slots) else None),
                    first_row=first_row,
                    gather=gather, pad=pad, max_count=max_count,
                    identity=len(slots) == 1 and len(rows) == len(token_slots), blocks=blocks,
                    cpu_meta=cpu_meta, num_tokens=len(token_slots))


@lru_cache(maxsize=64)
def _single_shard_chunks(out: int, rank: int) -> torch.Tensor:
    return lora_chunks([out], rank)


def lora_add_(y: torch.Tensor, x: torch.Tensor, plan: LoraPlan, a_stack: torch.Tensor,
              b_stack: torch.Tensor, chunks: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] += B_s @ (A_s @ x[t]) for the planned rows, in place; scales live in B.

    x [T, in], y [T, out], a_stack [S, R, in], b_stack [S, out, R]. `chunks`: the CPU kernel's
    column blocks (`lora_chunks`: a fused linear's block-diagonal B skips its zeros)."""
    if plan.num_tokens >= 0 and plan.num_tokens != x.shape[0]:
        # The kernels index x and y by the plan's rows unchecked: another step's plan would
        # read and write past them.
        raise ValueError(f"LoRA plan made for {plan.num_tokens} tokens, batch has {x.shape[0]}")
    if plan.blocks is not None and x.is_cuda:  # the plan chose Triton (see `make_plan`)
        return lora_add_triton_(y, x, plan, a_stack, b_stack)
    if plan.cpu_meta is not None and (k := cpu_kernels()) and k.supports_lora(x, y, a_stack,
                                                                              b_stack):
        n_rows, rank, fan_in = len(plan.rows), a_stack.shape[1], a_stack.shape[2]
        if plan.scratch is None or plan.scratch.numel() < n_rows * (fan_in + rank):
            plan.scratch = torch.empty(n_rows * (fan_in + rank), dtype=torch.float32)
        if chunks is None:
            chunks = _single_shard_chunks(b_stack.shape[1], rank)
        k.lora_sgmv(y, x, a_stack, b_stack, plan.cpu_meta, len(plan.slots), chunks, plan.scratch)
        return y
    if plan.identity:
        s = plan.slots[0]
        y += (x @ a_stack[s].t()) @ b_stack[s].t()
        return y
    if len(plan.slots) == 1:  # one slot, some rows without an adapter
        s = plan.slots[0]
        d = (x.index_select(0, plan.rows) @ a_stack[s].t()) @ b_stack[s].t()
        y.index_add_(0, plan.rows, d.to(y.dtype))
        return y
    # Several slots: gather into [U, M, in], one bmm per factor, scatter-add back. Few ops
    # matter more than FLOPs here: this runs for every LoRA linear of every layer.
    n_used, m = len(plan.slots), plan.max_count
    if plan.slot_range is not None:
        lo, hi = plan.slot_range
        a, b = a_stack[lo:hi], b_stack[lo:hi]
    else:
        a, b = a_stack.index_select(0, plan.slot_index), b_stack.index_select(0, plan.slot_index)
    if plan.first_row is not None:
        r0, r1 = plan.first_row, plan.first_row + n_used * m
        h = torch.bmm(x[r0:r1].reshape(n_used, m, -1), a.transpose(1, 2))
        y[r0:r1].view(n_used, m, -1).add_(torch.bmm(h, b.transpose(1, 2)))
        return y
    assert plan.gather is not None
    h = torch.bmm(x.index_select(0, plan.gather).view(n_used, m, -1), a.transpose(1, 2))
    if plan.pad is not None:
        h.masked_fill_(plan.pad, 0.0)  # padding rows then add exact zeros to their repeated row
    d = torch.bmm(h, b.transpose(1, 2)).view(n_used * m, -1)
    y.index_add_(0, plan.gather, d.to(y.dtype))
    return y
