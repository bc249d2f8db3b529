"""Paged attention: the backend interface and a portable torch implementation.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim].
Each step the runner builds one `AttentionMetadata` for the whole flat batch of tokens; every
layer writes its new K/V through `slot_mapping` and reads each sequence's context through its
block table, so prefill, chunked prefill over an existing cache, and decode share one path.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("tokenmill.attention")


@dataclass
class SeqGroup:
    """Sequences attended to in one batched call (same kind: all decode, or one prefill)."""

    token_index: torch.Tensor  # [B, Q] rows of the flat batch (Q = 1 for decode)
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    mask: torch.Tensor  # [B, 1, Q, max_blocks * block_size] bool, True = attend
    num_queries: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    groups: list[SeqGroup]
    num_tokens: int


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
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] → [T, Hq, D]; writes k/v into kv_cache first."""


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
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        prefill = [i for i, q in enumerate(query_lens) if q > 1]
        groups: list[SeqGroup] = []
        if decode:
            groups.append(self._group([starts[i] for i in decode], [1] * len(decode),
                                      [context_lens[i] for i in decode],
                                      [block_tables[i] for i in decode], block_size,
                                      sliding_window, device))
        for i in prefill:
            groups.append(self._group([starts[i]], [query_lens[i]], [context_lens[i]],
                                      [block_tables[i]], block_size, sliding_window, device))
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            groups=groups, num_tokens=pos)

    @staticmethod
    def _group(starts: list[int], qlens: list[int], ctxs: list[int], tables: list[list[int]],
               block_size: int, window: int | None, device: torch.device) -> SeqGroup:
        nq = max(qlens)
        nblocks = max(-(-c // block_size) for c in ctxs)
        index = torch.tensor([[s + min(j, q - 1) for j in range(nq)] for s, q in zip(starts, qlens)],
                             dtype=torch.long)
        table = torch.zeros(len(tables), nblocks, dtype=torch.long)
        for r, t in enumerate(tables):
            n = -(-ctxs[r] // block_size)
            table[r, :n] = torch.tensor(t[:n], dtype=torch.long)
        ctx = torch.tensor(ctxs, dtype=torch.long)
        qpos = ctx[:, None] - torch.tensor(qlens)[:, None] + torch.arange(nq)[None, :]  # [B, Q]
        kpos = torch.arange(nblocks * block_size)[None, None, :]  # [1, 1, K]
        mask = kpos <= qpos[:, :, None]
        if window is not None:
            mask &= kpos > qpos[:, :, None] - window
        return SeqGroup(token_index=index.to(device), block_tables=table.to(device),
                        mask=mask[:, None].to(device), num_queries=nq)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        _, num_blocks, block_size, hk, d = kv_cache.shape
        k_flat = kv_cache[0].view(num_blocks * block_size, hk, d)
        v_flat = kv_cache[1].view(num_blocks * block_size, hk, d)
        k_flat.index_copy_(0, meta.slot_mapping, k.to(kv_cache.dtype))
        v_flat.index_copy_(0, meta.slot_mapping, v.to(kv_cache.dtype))
        out = torch.empty_like(q)
        for g in meta.groups:
            b, nq = g.token_index.shape
            qg = q[g.token_index.reshape(-1)].view(b, nq, -1, d).transpose(1, 2)  # [B, Hq, Q, D]
            kg = kv_cache[0][g.block_tables].view(b, -1, hk, d).transpose(1, 2)  # [B, Hk, K, D]
            vg = kv_cache[1][g.block_tables].view(b, -1, hk, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kg.to(q.dtype), vg.to(q.dtype),
                                               attn_mask=g.mask, scale=scale,
                                               enable_gqa=kg.shape[1] != qg.shape[1])
            o = o.transpose(1, 2).reshape(b * nq, -1, d)
            # Padded query rows (shorter prefills never share a group) map back one to one.
            out[g.token_index.reshape(-1)] = o
        return out


_BACKENDS: dict[str, type[AttentionBackend]] = {"torch-sdpa": TorchPagedAttention}


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "auto":
        name = "torch-sdpa"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    backend = _BACKENDS[name]()
    logger.info("attention backend: %s on %s", backend.name, device)
    return backend
