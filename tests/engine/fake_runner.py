"""A model stand-in that checks the scheduler's bookkeeping for real.

It simulates the KV cache slot by slot: computing a chunk "writes" (position, token) into the
slots the block table gives, and first "reads" every earlier position of the sequence from the
cache, failing if a slot does not hold what a real model would need there. The next token is a
deterministic function of the whole sequence, so expected outputs are known in advance.
"""

from __future__ import annotations

from tokenmill.engine.outputs import RunnerOutput, SchedulerOutput

VOCAB = 1000


def next_token(seq: list[int]) -> int:
    h = 1469598103934665603
    for t in seq[-8:]:
        h = ((h ^ t) * 1099511628211) % 2**64
    return h % VOCAB


def expected_output(prompt: list[int], max_new: int, eos: int | None = None) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_new):
        t = next_token(seq)
        seq.append(t)
        out.append(t)
        if t == eos:
            break
    return out


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[int, tuple[int, int]] = {}  # slot -> (position, token)
        self.seqs: dict[str, list[int]] = {}  # tokens the runner knows per request
        self.steps = 0
        self.tokens_computed = 0

    def _slot(self, table: list[int], pos: int) -> int:
        assert pos // self.block_size < len(table), "block table too short"
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self.steps += 1
        for rid in (*so.finished_req_ids, *so.preempted_req_ids):
            self.seqs.pop(rid, None)
        for nr in so.new_requests:
            self.seqs[nr.request_id] = nr.prompt_token_ids + nr.output_token_ids
        out = RunnerOutput()
        seen: set[int] = set()
        for c in so.chunks:
            seq = self.seqs[c.request_id]
            assert c.token_ids == seq[c.start:c.start + len(c.token_ids)]
            for p in range(c.start):  # read the context the cache must already hold
                assert self.slots.get(self._slot(c.block_ids, p)) == (p, seq[p]), \
                    f"{c.request_id}: cache slot for position {p} is wrong"
            for i, t in enumerate(c.token_ids):
                slot = self._slot(c.block_ids, c.start + i)
                assert slot not in seen, "two sequences write one slot in a step"
                seen.add(slot)
                self.slots[slot] = (c.start + i, t)
            self.tokens_computed += len(c.token_ids)
            if c.sample:
                assert c.start + len(c.token_ids) == len(seq)
                tok = next_token(seq)
                seq.append(tok)
                out.sampled[c.request_id] = tok
        return out
