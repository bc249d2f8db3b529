"""Paged attention: the backend interface and a portable torch implementation.

The KV cache of one layer is a tensor [2, num_kv_heads, num_blocks, block_size, head_dim]:
heads outermost, so gathering a batch's blocks yields [heads, batch, context, head_dim], the
layout batched matmuls take without another copy. The int8 cache (`--kv-cache-dtype int8`)
is [2, num_kv_heads, num_blocks, block_bytes] in layers/kv_int8.py's layout, dequantized as
it is gathered; a float8 cache (`fp8_e4m3fn`, `fp8_e5m2`) has the plain layout, values cast
(saturating) as they are written and widened as they are read.
Each step the runner builds one `AttentionMetadata` for the whole flat batch of tokens; every
layer writes its new K/V through `slot_mapping` and reads each sequence's context through its
block table, so prefill, chunked prefill over an existing cache, and decode share one path.
On CPU with the native kernels every row (decode or prefill) is its own query read straight
from the cache (`RowKeys`); the gather + SDPA / batched-matmul paths are the fallback.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import cpu_kernels
from tokenmill.kernels.triton_support import interpreted, triton_available
from tokenmill.layers import kv_int8

logger = logging.getLogger("tokenmill.attention")


@dataclass
class SeqGroup:
    """Sequences attended to in one batched call (same kind: all decode, or one prefill)."""

    token_index: torch.Tensor  # [B, Q] rows of the flat batch (Q = 1 for decode)
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    mask: torch.Tensor  # [B, 1, Q, max_blocks * block_size] bool, True = attend
    num_queries: int
    whole_batch: bool = False  # the rows are exactly 0..T-1 in order (a decode-only step)
    # One sequence: the key positions it attends to, [start, end) (no mask needed).
    key_range: tuple[int, int] | None = None


@dataclass
class RowKeys:
    """Every row of the step as its own query, the native CPU kernel's view of any step
    (decode, prefill, mixed): the sequence it belongs to, that sequence's block table, and the
    key positions [start, end) it attends to (causal, and windowed). Host int64 tensors."""

    seq: torch.Tensor  # [T] index into tables
    tables: torch.Tensor  # [S, max_blocks], padded with block 0
    bounds: torch.Tensor  # [T, 2]
    max_keys: int  # the longest end - start


@dataclass
class DeviceRows:
    """A step as the Triton kernel walks it (layers/triton_attention.py): device int32 tensors."""

    qblocks: torch.Tensor  # [n, 2] (sequence, first query row within it) per program
    seqs: torch.Tensor  # [S, 3] (first row in the flat batch, query length, context length)
    tables: torch.Tensor  # [S, max_blocks] block ids, padded with 0
    block_q: int  # query tokens per program
    window: int  # sliding window, 0 for none
    max_keys: int = 0  # a decode step's longest key range (host int): split-key decisions
    # Key splits of a decode step: 0, decode_splits decides from max_keys; n > 0, exactly n
    # (CUDA graphs record a fixed count; splits left without keys merge to nothing).
    splits: int = 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    num_tokens: int
    rows: RowKeys | None = None  # built for CPU steps
    device_rows: DeviceRows | None = None  # built by the Triton backend
    # The per-group view (decode rows together, each prefill alone) that the gather + SDPA
    # path reads. Built on first use: the native CPU path reads only `rows`.
    make_groups: Callable[[], list[SeqGroup]] | None = field(default=None, repr=False)
    _groups: list[SeqGroup] | None = field(default=None, repr=False)

    @property
    def groups(self) -> list[SeqGroup]:
        if self._groups is None:
            self._groups = self.make_groups() if self.make_groups is not None else []
        return self._groups


class AttentionBackend(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        sliding_window: int | None,
        device: torch.device,
    ) -> AttentionMetadata: ...

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                kv_written: bool = False) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] → [T, Hq, D]; writes k/v into kv_cache first, unless
        the caller already has (`kv_written`: the fused rotary + cache write kernel)."""


class TorchPagedAttention(AttentionBackend):
    """Gathers each sequence's context from the cache and runs SDPA with an explicit mask.

    All decode rows go in one padded call (a query of one token each). Each prefill chunk gets
    its own call, which keeps padding waste to zero. Padded key slots are masked, so a row's
    result does not depend on the other rows in the batch.
    """

    name = "torch-sdpa"

    def build_metadata(self, query_lens: list[int], context_lens: list[int],
                       block_tables: list[list[int]], block_size: int,
                       sliding_window: int | None, device: torch.device) -> AttentionMetadata:
        slots: list[int] = []
        starts: list[int] = []
        pos = 0
        for qlen, ctx, table in zip(query_lens, context_lens, block_tables):
            starts.append(pos)
            for p in range(ctx - qlen, ctx):
                slots.append(table[p // block_size] * block_size + p % block_size)
            pos += qlen
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device), num_tokens=pos,
            rows=(_row_keys(query_lens, context_lens, block_tables, block_size, sliding_window)
                  if device.type == "cpu" else None),
            make_groups=partial(self._groups, starts, query_lens, context_lens, block_tables,
                                block_size, sliding_window, device))

    def _groups(self, starts: list[int], query_lens: list[int], context_lens: list[int],
                block_tables: list[list[int]], block_size: int, sliding_window: int | None,
                device: torch.device) -> list[SeqGroup]:
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        prefill = [i for i, q in enumerate(query_lens) if q > 1]
        groups: list[SeqGroup] = []
        if decode:
            groups.append(self._group([starts[i] for i in decode], [1] * len(decode),
                                      [context_lens[i] for i in decode],
                                      [block_tables[i] for i in decode], block_size,
                                      sliding_window, device))
            groups[0].whole_batch = not prefill
        for i in prefill:
            groups.append(self._group([starts[i]], [query_lens[i]], [context_lens[i]],
                                      [block_tables[i]], block_size, sliding_window, device))
        return groups

    @staticmethod
    def _group(starts: list[int], qlens: list[int], ctxs: list[int], tables: list[list[int]],
               block_size: int, window: int | None, device: torch.device) -> SeqGroup:
        nq = max(qlens)
        index = torch.tensor([[s + min(j, q - 1) for j in range(nq)] for s, q in zip(starts, qlens)],
                             dtype=torch.long)
        table = _block_tables(tables, ctxs, block_size)
        ctx = torch.tensor(ctxs, dtype=torch.long)
        qpos = ctx[:, None] - torch.tensor(qlens)[:, None] + torch.arange(nq)[None, :]  # [B, Q]
        kpos = torch.arange(table.shape[1] * block_size)[None, None, :]  # [1, 1, K]
        mask = kpos <= qpos[:, :, None]
        if window is not None:
            mask &= kpos > qpos[:, :, None] - window
        key_range = None
        if len(ctxs) == 1:
            key_range = (0 if window is None else max(0, ctxs[0] - window), ctxs[0])
        return SeqGroup(token_index=index.to(device), block_tables=table.to(device),
                        mask=mask[:, None].to(device), num_queries=nq, key_range=key_range)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                kv_written: bool = False) -> torch.Tensor:
        hk, d = kv_cache.shape[1], q.shape[2]
        same = kv_cache.dtype == q.dtype  # (a no-op .to() still costs a dispatch per layer)
        if not kv_written:
            self.write_kv(k, v, kv_cache, meta)
        per_row = meta.rows
        if (per_row is not None and (kern := cpu_kernels()) is not None
                and kern.supports_decode(q, kv_cache)):  # every row straight from the cache
            return kern.paged_decode(q, kv_cache, per_row.tables, per_row.bounds,
                                     per_row.max_keys, scale, per_row.seq)
        if len(meta.groups) == 1 and meta.groups[0].whole_batch:  # decode only: no scatter
            g = meta.groups[0]
            kg, vg = _gather_kv(kv_cache, g.block_tables, d, q.dtype)
            if g.key_range is not None and q.device.type == "cpu":
                return self._decode_one(q, kg, vg, g.key_range, scale)
            if not same:
                kg, vg = kg.to(q.dtype), vg.to(q.dtype)
            return self._decode(q, kg, vg, g.mask, scale)
        out = torch.empty_like(q)
        for g in meta.groups:
            b, nq = g.token_index.shape
            rows = g.token_index.reshape(-1)
            kg, vg = _gather_kv(kv_cache, g.block_tables, d, q.dtype)  # [Hk, B, K, D]
            kg, vg = kg.to(q.dtype), vg.to(q.dtype)
            if nq == 1:
                out[rows] = self._decode(q[rows], kg, vg, g.mask, scale)
                continue
            qg = q[rows].view(b, nq, -1, d).transpose(1, 2)  # [B, Hq, Q, D]
            gqa = hk != qg.shape[1]
            if g.key_range == (0, nq):  # a fresh prompt (no cached keys, no window cut)
                # causal over exactly its keys, no mask: SDPA's flash kernels apply, where a
                # mask forces the math one and its [Hq, Q, K] scores (~8 GB at 8k tokens)
                o = F.scaled_dot_product_attention(
                    qg, kg[:, :, :nq].transpose(0, 1), vg[:, :, :nq].transpose(0, 1),
                    is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(qg, kg.transpose(0, 1), vg.transpose(0, 1),
                                                   attn_mask=g.mask, scale=scale,
                                                   enable_gqa=gqa)
            out[rows] = o.transpose(1, 2).reshape(b * nq, -1, d)
        return out

    @staticmethod
    def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """k/v [T, Hk, D] into their cache slots (`meta.slot_mapping`)."""
        if kv_cache.dtype == torch.int8:
            kv_int8.write(kv_cache, k, v, meta.slot_mapping)
            return
        _, hk, num_blocks, block_size, d = kv_cache.shape
        # float8 as bytes: torch's CPU index_copy_ has no float8 kernel
        cache = kv_cache.view(torch.uint8) if kv_cache.dtype in FLOAT8 else kv_cache
        for i, new in ((0, k), (1, v)):
            new = new.transpose(0, 1)
            if new.dtype != kv_cache.dtype:
                new = to_cache_dtype(new, kv_cache.dtype)
            cache[i].view(hk, num_blocks * block_size, d).index_copy_(
                1, meta.slot_mapping, new.view(cache.dtype))

    @staticmethod
    def _decode_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_range: tuple[int, int], scale: float) -> torch.Tensor:
        """A single decoding sequence (CPU): its keys are a contiguous range, so no mask, and
        the math runs in float32, where CPU SDPA takes ~25 us against ~85 us for bfloat16's
        small batched matmuls (SmolLM2, 150 keys, 2 threads)."""
        hq, d = q.shape[1], q.shape[2]
        a, b = key_range
        kf = k[:, 0, a:b].float().unsqueeze(0)  # [1, Hk, ctx, D]
        vf = v[:, 0, a:b].float().unsqueeze(0)
        o = F.scaled_dot_product_attention(q.float().view(1, hq, 1, d), kf, vf, scale=scale,
                                           enable_gqa=kf.shape[1] != hq)
        return o.view(1, hq, d).to(q.dtype)

    @staticmethod
    def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
        """One query token per sequence as two batched matmuls over (KV head, sequence). The
        query heads sharing a KV head are folded into the query dim, so K/V are never
        repeated. On CPU this is several times faster than SDPA for single-token queries."""
        b, hq, d = q.shape
        hk, _, ctx, _ = k.shape
        g = hq // hk  # query head h uses KV head h // g, as in transformers' repeat_kv
        qg = q.reshape(b, hk, g, d).transpose(0, 1).reshape(hk * b, g, d)
        scores = torch.bmm(qg, k.view(hk * b, ctx, d).transpose(1, 2)).float() * scale
        scores = scores.view(hk, b, g, ctx).masked_fill_(~mask.view(1, b, 1, ctx), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(hk * b, g, ctx)
        o = torch.bmm(probs, v.view(hk * b, ctx, d)).view(hk, b, g, d)
        return o.transpose(0, 1).reshape(b, hq, d)


def _row_keys(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, window: int | None) -> RowKeys:
    # Built in lists, then one tensor each: the same thing in small torch ops took ~0.2 ms
    # of dispatch a step, 5% of a batch-1 decode step.
    seq: list[int] = []
    bounds: list[int] = []  # start, end per row
    for i, (q, c) in enumerate(zip(query_lens, context_lens)):
        seq += [i] * q
        for end in range(c - q + 1, c + 1):  # a row attends up to its own position
            bounds += (0 if window is None else max(0, end - window), end)
    return RowKeys(seq=torch.tensor(seq, dtype=torch.long),
                   tables=_block_tables(block_tables, context_lens, block_size),
                   bounds=torch.tensor(bounds, dtype=torch.long).view(-1, 2),
                   max_keys=max(c if window is None else min(c, window) for c in context_lens))


def _block_tables(tables: list[list[int]], ctxs: list[int], block_size: int) -> torch.Tensor:
    """[B, max_blocks] int64: each sequence's blocks that hold its context, padded with 0."""
    counts = [-(-c // block_size) for c in ctxs]
    width = max(counts)
    return torch.tensor([t[:n] + [0] * (width - n) for t, n in zip(tables, counts)],
                        dtype=torch.long)


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# `--kv-cache-dtype` names of the float8 caches (config.KV_CACHE_DTYPES).
FLOAT8_CACHES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to a cache of `dtype`. Into float8 the cast saturates at the type's largest
    finite value (448 for e4m3fn), as TGI's and vLLM's fp8 caches do: torch's plain cast
    makes a larger key NaN (e4m3fn has no infinity), which would poison every later step."""
    if dtype in FLOAT8:
        top = torch.finfo(dtype).max
        return x.clamp(-top, top).to(dtype)
    return x.to(dtype)


def _gather_kv(kv_cache: torch.Tensor, tables: torch.Tensor, d: int, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the blocks in `tables`, [Hk, B, max_blocks * bs, D] each: the cache's own
    dtype, or the int8 cache's rows dequantized to `dtype`."""
    if kv_cache.dtype == torch.int8:
        return kv_int8.gather(kv_cache, tables, d, dtype)
    return _gather(kv_cache[0], tables), _gather(kv_cache[1], tables)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[Hk, num_blocks, bs, D] → [Hk, B, max_blocks * bs, D]. index_select over whole blocks
    copies contiguous rows; advanced indexing is about 3x slower on CPU."""
    hk, nb, bs, d = cache.shape
    b = tables.shape[0]
    raw = cache.view(torch.uint8) if cache.dtype in FLOAT8 else cache  # as in write_kv
    rows = raw.view(hk, nb, bs * d).index_select(1, tables.reshape(-1)).view(hk, b, -1, d)
    return rows.view(cache.dtype)


_BACKENDS: dict[str, type[AttentionBackend]] = {"torch-sdpa": TorchPagedAttention}


def get_attention_backend(name: str, device: torch.device,
                          kv_cache_dtype: str = "auto") -> AttentionBackend:
    """"auto": the Triton kernel on CUDA when triton imports (TOKENMILL_TRITON_ATTENTION=0
    opts out) and passes its self-check for this cache (`--kv-cache-dtype`), else gather +
    SDPA, whose CPU steps take the native per-row kernel."""
    from tokenmill.layers import triton_attention as ta  # it imports this module

    backends: dict[str, type[AttentionBackend]] = {**_BACKENDS,
                                                   "triton": ta.TritonPagedAttention}
    if name == "auto":
        name = "torch-sdpa"
        if (device.type == "cuda" and triton_available()
                and os.environ.get("TOKENMILL_TRITON_ATTENTION", "1") != "0"):
            problem = ta.self_check(device, kv_cache_dtype)
            if problem is None:
                name = "triton"
            else:
                logger.warning("Triton attention failed its check, using gather + SDPA: %s",
                               problem[:500])
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(backends)}")
    if name == "triton" and not (triton_available()
                                 and (device.type == "cuda" or interpreted())):
        raise ValueError("the triton attention backend needs triton and a CUDA device")
    backend = backends[name]()
    logger.info("attention backend: %s on %s", backend.name, device)
    return backend
