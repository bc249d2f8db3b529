"""Continuous batching under one token budget (the vLLM v1 rule): there is no prefill phase
and no decode phase; every request has `num_computed_tokens` catching up to `num_tokens`, and
each step hands out at most `max_batch_prefill_tokens` of catch-up. That one rule covers
chunked prefill, decodes mixed with prefills, prefix-cache hits and recompute after
preemption. Pure Python: tested with hand-built RunnerOutputs, no model needed.
"""

from __future__ import annotations

from collections import deque

from tokenmill.config import SchedulerConfig
from tokenmill.engine.adapters import AdapterSlots
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.outputs import NewRequestData, RunnerOutput, ScheduledChunk, SchedulerOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.protocol import EngineOutput, FinishReason, TokenLogprob


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []  # to tell the runner at the next step
        self._prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}
        self.num_preemptions = 0
        self.adapters = AdapterSlots(config.max_active_adapters)

    # ---- intake ------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.num_prompt_tokens == 0:
            raise ValueError("the prompt must contain at least one token")
        if req.num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"the prompt has {req.num_prompt_tokens} tokens; this engine takes "
                             f"at most {self.max_model_len - 1}")
        if (not self.config.enable_chunked_prefill
                and req.num_prompt_tokens > self.config.max_batch_prefill_tokens):
            raise ValueError("the prompt is longer than max_batch_prefill_tokens and chunked "
                             "prefill is disabled")
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._finish(req, FinishReason.ABORT)
        return True

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_batch_prefill_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk_size(req, req.num_tokens - req.num_computed_tokens, budget)
            if n == 0:
                break
            while not self.kv.allocate_slots(req, n):
                # Out of blocks: recompute the newest request later rather than fail.
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            else:
                self._emit_chunk(req, n, out)
                budget -= n
                i += 1

        # New work only when nothing had to be preempted this step (avoids thrashing).
        blocked: list[Request] = []  # waiting for an adapter slot: skipped, not blocking
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.adapter_id is not None and not self._pin_adapter(req, out):
                blocked.append(self.waiting.popleft())
                continue
            # Prompt logprobs need every prompt position computed: no prefix reuse until sent.
            skip_cache = req.params.prompt_logprobs is not None and not req.output_token_ids
            computed = [] if skip_cache else self.kv.get_computed_blocks(req)
            num_cached = len(computed) * self.kv.block_size
            n = self._chunk_size(req, req.num_tokens - num_cached, budget)
            if n == 0 or not self.kv.allocate_slots(req, n, computed):
                self._unpin_adapter(req)
                break
            self.waiting.popleft()
            self.kv.record_prefix_lookup(req.num_prompt_tokens, num_cached)
            req.num_computed_tokens = num_cached
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.new_requests.append(NewRequestData(
                request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                output_token_ids=list(req.output_token_ids), params=req.params, seed=req.seed,
                stop_token_ids=sorted(req.stop_token_ids), adapter_id=req.adapter_id,
                lora_slot=req.lora_slot))
            self._emit_chunk(req, n, out)
            budget -= n
        self.waiting.extendleft(reversed(blocked))
        return out

    def _pin_adapter(self, req: Request, out: SchedulerOutput) -> bool:
        assert req.adapter_id is not None
        got = self.adapters.acquire(req.adapter_id)
        if got is None:
            return False
        req.lora_slot, placed = got
        if placed:  # the runner copies the weights into the slot before this step runs
            out.lora_loads.append((req.lora_slot, req.adapter_id))
        return True

    def _unpin_adapter(self, req: Request) -> None:
        if req.adapter_id is not None and req.lora_slot >= 0:
            self.adapters.release(req.adapter_id)
        req.lora_slot = -1

    def _chunk_size(self, req: Request, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _emit_chunk(self, req: Request, n: int, out: SchedulerOutput) -> None:
        start = req.num_computed_tokens
        out.chunks.append(ScheduledChunk(
            request_id=req.request_id, start=start,
            token_ids=req.token_ids_slice(start, start + n), block_ids=list(req.block_ids),
            sample=start + n == req.num_tokens))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        self._unpin_adapter(req)
        self._prompt_logprobs.pop(req.request_id, None)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted_req_ids.append(req.request_id)

    # ---- results -----------------------------------------------------------------------
    def update(self, so: SchedulerOutput, ro: RunnerOutput) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        for chunk in so.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens = chunk.start + len(chunk.token_ids)
            self.kv.cache_full_blocks(req)
            if chunk.request_id in ro.prompt_logprobs:
                acc = self._prompt_logprobs.setdefault(req.request_id, [None])
                acc.extend(ro.prompt_logprobs[chunk.request_id])
            if not chunk.sample:
                continue
            token = ro.sampled[req.request_id]
            first = not req.output_token_ids
            req.output_token_ids.append(token)
            reason = req.check_stop(self.max_model_len)
            lp = ro.logprobs.get(req.request_id)
            outputs.append(EngineOutput(
                request_id=req.request_id, new_token_ids=[token], finish_reason=reason,
                logprobs=[lp] if lp is not None else None,
                prompt_logprobs=self._prompt_logprobs.pop(req.request_id, None) if first else None,
                num_cached_tokens=req.num_cached_tokens if first else 0,
                seed=req.seed if first else None))
            if reason is not None:
                self._finish(req, reason)
        return outputs

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._finished_ids.append(req.request_id)
            self._unpin_adapter(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        self._prompt_logprobs.pop(req.request_id, None)
