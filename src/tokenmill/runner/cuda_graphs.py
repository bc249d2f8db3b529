"""CUDA graphs of decode steps (TGI's `--cuda-graphs`): the model's forward of a decode-only
step recorded once per batch-size bucket and replayed, so a step costs one graph launch instead
of a dozen kernel launches per layer issued from Python.

Each bucket's graph reads static buffers: the token ids, positions and cache slots, and the
Triton attention kernel's view of the step (`DeviceRows`: one query block per row, the rows'
context lengths, block tables as wide as the longest context). A step of n rows replays the
smallest bucket >= n: its rows are copied into the buffers and the rest padded as empty
sequences (no query, no keys: the attention kernel skips them) whose K/V land in a scratch
block the KV manager never hands out. Only decode-only steps on the Triton backend without
LoRA rows replay; everything else runs eagerly, and so does everything if a capture fails.

Long contexts: a decode step whose (sequence, KV head) programs are too few to fill the GPU
splits each one's keys over several programs (`decode_splits`, flash-decoding). A bucket that
small is recorded twice: without splits, and with the most splits its batch could want (as for
the longest context; the splits a shorter one leaves without keys merge to nothing). A step
replays the first when it would not split eagerly, the second when it would: small batches
at long contexts, the launch-bound case graphs are for, replay too.

`eager=True` runs the same padded static-buffer path without recording (tests on the CPU, in
triton's interpreter, check the padding against a plain forward).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tokenmill.layers.attention import AttentionMetadata, DeviceRows
from tokenmill.layers.triton_attention import MAX_SPLITS, SPLIT_MIN_KEYS, decode_splits

logger = logging.getLogger("tokenmill.cuda_graphs")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, device: torch.device, buckets: list[int],
                 max_blocks_per_seq: int, scratch_slot: int, window: int | None,
                 eager: bool = False) -> None:
        self.model = model
        self.device = device
        self.buckets = sorted(set(buckets))
        self.eager = eager
        self.window = window or 0
        self.num_kv_heads = int(model.cfg.num_kv_heads)  # type: ignore[union-attr, arg-type]
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.scratch_slot = scratch_slot
        self.slots = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        rows = torch.arange(n, dtype=torch.int32, device=device)
        self.qblocks = torch.stack([rows, torch.zeros_like(rows)], 1)  # row i: sequence i
        self.seqs = torch.stack([rows, torch.zeros_like(rows), torch.zeros_like(rows)], 1)
        self.tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        # each bucket's split count for long contexts (1: its batch fills the GPU alone)
        self.splits = {b: decode_splits(b * self.num_kv_heads, MAX_SPLITS * SPLIT_MIN_KEYS,
                                        device) for b in self.buckets}
        # (bucket, splits) -> (its graph and output buffer) or None for the eager padded path
        self._run: dict[tuple[int, int], tuple[Any, torch.Tensor] | None] = {}
        self._pool: Any = None

    def _variants(self) -> list[tuple[int, int]]:
        """What `capture` records, largest bucket first."""
        return [(b, s) for b in reversed(self.buckets)
                for s in sorted({1, self.splits[b]}, reverse=True)]

    def _meta(self, b: int, splits: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b], num_tokens=b,
            device_rows=DeviceRows(qblocks=self.qblocks[:b], seqs=self.seqs[:b],
                                   tables=self.tables[:b], block_q=1, window=self.window,
                                   splits=splits))

    def _forward(self, b: int, splits: int) -> torch.Tensor:
        return self.model(self.ids[:b], self.positions[:b], self._meta(b, splits))

    @torch.inference_mode()
    def capture(self) -> bool:
        """Record every bucket (and split count), largest first (the others reuse its memory
        pool). False, with the graphs dropped, when recording fails: the engine then runs
        eagerly."""
        if self.eager:
            self._run = dict.fromkeys(self._variants())
            return True
        try:
            self._pool = torch.cuda.graph_pool_handle()
            for b, splits in self._variants():
                for _ in range(2):  # compile the Triton kernels, settle the allocator
                    self._forward(b, splits)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self._forward(b, splits)
                self._run[(b, splits)] = (graph, out)
        except Exception as e:  # a model op that cannot be recorded: stay correct, run eagerly
            logger.warning("CUDA graph capture failed, decode runs eagerly: %s", e)
            self._run.clear()
            return False
        logger.info("CUDA graphs captured for decode batch sizes %s (with split keys for %s)",
                    self.buckets, [b for b in self.buckets if self.splits[b] > 1])
        return True

    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def run(self, ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor | None:
        """The step's hidden states [n, H] from a replay, or None when it does not qualify
        (not decode-only, larger than the largest bucket, no Triton view, not captured)."""
        rows = meta.device_rows
        n = ids.shape[0]
        b = self.bucket(n)
        if (rows is None or b is None or rows.block_q != 1 or rows.qblocks.shape[0] != n
                or rows.tables.shape[1] > self.tables.shape[1]):
            return None
        split = decode_splits(n * self.num_kv_heads, rows.max_keys, self.device) > 1
        key = (b, self.splits[b] if split else 1)
        if key not in self._run:
            return None
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.seqs[:n, 1:].copy_(rows.seqs[:, 1:])  # (query length 1, context length)
        self.tables[:n, : rows.tables.shape[1]].copy_(rows.tables)
        if b > n:  # padding rows: empty sequences writing into the scratch block
            self.ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slots[n:b].fill_(self.scratch_slot)
            self.seqs[n:b, 1:].zero_()
        recorded = self._run[key]
        if recorded is None:
            return self._forward(*key)[:n]
        graph, out = recorded
        graph.replay()
        return out[:n]
