"""The two seams of one engine step: what to compute, and what came out.

Plain data only (lists, ints, small structs), so the same objects can later be broadcast to
tensor-parallel ranks or logged; the runner keeps its own per-request state and receives
full request data only when a request (re)enters the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.protocol import SamplingParams, TokenLogprob


@dataclass(slots=True)
class NewRequestData:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resuming after preemption
    params: SamplingParams
    seed: int
    stop_token_ids: list[int]
    adapter_id: str | None = None
    lora_slot: int = -1  # the device slot holding the adapter's weights (-1: base model)


@dataclass(slots=True)
class ScheduledChunk:
    request_id: str
    start: int  # position of the first token computed this step (= num_computed_tokens)
    token_ids: list[int]  # the tokens whose K/V are computed now
    block_ids: list[int]  # the request's whole block table
    sample: bool  # the chunk reaches the last known token: sample the next one


@dataclass(slots=True)
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Requests the runner must forget (finished, aborted or preempted) before this step.
    finished_req_ids: list[str] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    # LoRA adapters to copy into device slots before this step: (slot, adapter name).
    lora_loads: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    # Logprobs of prompt tokens computed in this step's chunk (the first prompt token has none).
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
