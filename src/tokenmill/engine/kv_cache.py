"""KV block pool: allocation, ref-counts and the automatic prefix cache. Pure Python.

Blocks hold `block_size` token slots for every layer. A block becomes *full* once all its
slots hold computed K/V; full blocks get a chained hash of (parent hash, adapter id, token ids)
and can then be shared by any request whose prompt starts with the same tokens.

Eviction is lazy, as in nano-vllm and vLLM: a block whose ref-count drops to zero goes to the
tail of the free queue still carrying its hash, so a later request may revive it. Allocation
takes from the head (least recently freed) and only then forgets the old hash.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenmill.engine.request import Request

BlockHash = int


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions


@dataclass(slots=True)
class _ReqBlocks:
    hashes: list[BlockHash]  # hashes of the request's first len(hashes) blocks


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[BlockHash, int] = {}
        self.req_blocks: dict[str, _ReqBlocks] = {}
        # Counters for metrics and tests.
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens served from the cache

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def hash_block(parent: BlockHash | None, adapter_id: str | None,
                   token_ids: tuple[int, ...]) -> BlockHash:
        return hash((parent, adapter_id, token_ids))

    def get_computed_blocks(self, req: Request) -> list[int]:
        """The longest run of cached full blocks that prefixes the request's tokens.

        At least one token is always left to compute: its logits start the generation.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        found: list[int] = []
        parent: BlockHash | None = None
        for i in range(max_blocks):
            tokens = tuple(req.token_ids_slice(i * bs, (i + 1) * bs))
            parent = self.hash_block(parent, req.cache_salt or req.adapter_id, tokens)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        return found

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    # ---- allocation ----------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `computed_blocks` (first scheduling only) are prefix-cache hits to share. Returns False,
        changing nothing, when the pool cannot supply the blocks.
        """
        computed_blocks = computed_blocks or []
        have = len(req.block_ids) + len(computed_blocks)
        total_tokens = req.num_computed_tokens + len(computed_blocks) * self.block_size
        need = self.blocks_needed(total_tokens + num_new_tokens) - have
        # Reviving a cached block that sits in the free queue uses up a free block too.
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if need + revived > self.num_free_blocks:
            return False
        for b in computed_blocks:
            self._touch(b)
        req.block_ids.extend(computed_blocks)
        if computed_blocks:
            entry = self.req_blocks.setdefault(req.request_id, _ReqBlocks([]))
            entry.hashes = [self.blocks[b].hash for b in computed_blocks]  # type: ignore[misc]
        for _ in range(max(need, 0)):
            req.block_ids.append(self._pop_free())
        return True

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict the cached content now, lazily
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        entry = self.req_blocks.setdefault(req.request_id, _ReqBlocks([]))
        num_full = min(req.num_computed_tokens // bs, len(req.block_ids))
        parent = entry.hashes[-1] if entry.hashes else None
        for i in range(len(entry.hashes), num_full):
            tokens = tuple(req.token_ids_slice(i * bs, (i + 1) * bs))
            parent = self.hash_block(parent, req.cache_salt or req.adapter_id, tokens)
            entry.hashes.append(parent)
            block = self.blocks[req.block_ids[i]]
            if block.hash is None and parent not in self.hash_to_block:
                block.hash = parent
                block.token_ids = tokens
                self.hash_to_block[parent] = block.block_id

    def free(self, req: Request) -> None:
        """Release the request's blocks; the tail goes first so shared prefixes live longest."""
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        req.block_ids = []
        self.req_blocks.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash = None
                block.token_ids = ()
        self.hash_to_block = {k: v for k, v in self.hash_to_block.items()
                              if self.blocks[v].hash == k}
