"""Engine-side state of one request. Pure Python: the scheduler and KV manager never see torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokenmill.protocol import FinishReason, SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # blocks freed; waits to be recomputed
    # Everything above here is finished.
    FINISHED = 3

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    eos_token_ids: frozenset[int] = frozenset()
    adapter_id: str | None = None
    # Prefix-cache salt: the adapter id plus its load generation, so blocks computed with an
    # unloaded adapter are never reused by a new adapter loaded under the same name.
    cache_salt: str | None = None
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache (prompt and output alike). The scheduler
    # advances it; prefill is "num_computed_tokens catching up to num_tokens".
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied (first schedule only)
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    lora_slot: int = -1  # the adapter's device slot while running (pinned), else -1
    max_tokens: int = 0  # cap on prompt + output, set by the scheduler from the model length

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_id_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def stop_token_ids(self) -> frozenset[int]:
        ids = frozenset(self.params.stop_token_ids)
        return ids if self.params.ignore_eos else ids | self.eos_token_ids

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Stop conditions known to the engine (stop strings are the detokenizer's job)."""
        last = self.output_token_ids[-1]
        n_out = len(self.output_token_ids)
        if n_out >= self.params.min_new_tokens and last in self.stop_token_ids:
            return FinishReason.EOS
        if n_out >= self.params.max_new_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None
