"""What callers of the offline and async APIs receive."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.protocol import FinishReason, TokenLogprob


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""  # all output text so far
    delta: str = ""  # the text added by this update
    token_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None  # the stop string that matched, if any
    logprobs: list[TokenLogprob] | None = None  # one per output token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
    seed: int | None = None
