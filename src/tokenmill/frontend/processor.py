"""Engine outputs → RequestOutputs: incremental detokenization, stop strings, accumulation.

Stop strings are found here, after detokenization, because they may span token boundaries;
a match finishes the request and the caller aborts it in the engine (one of the two
back-edges of the data path, the other being client aborts).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.frontend.outputs import RequestOutput
from tokenmill.protocol import EngineOutput, FinishReason, SamplingParams
from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(slots=True)
class _Tracked:
    out: RequestOutput
    detok: IncrementalDetokenizer
    want_logprobs: bool


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tracked: dict[str, _Tracked] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        detok = IncrementalDetokenizer(
            self.tokenizer, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            prompt_token_ids=prompt_token_ids)
        self.tracked[request_id] = _Tracked(
            RequestOutput(request_id=request_id, prompt_token_ids=prompt_token_ids,
                          logprobs=[] if params.logprobs is not None else None),
            detok, params.logprobs is not None)

    def remove(self, request_id: str) -> None:
        self.tracked.pop(request_id, None)

    def process(self, eo: EngineOutput) -> tuple[RequestOutput | None, bool]:
        """Returns (output update, whether the engine must abort the request: a stop string)."""
        t = self.tracked.get(eo.request_id)
        if t is None:
            return None, False
        out = t.out
        out.new_token_ids = eo.new_token_ids
        out.token_ids.extend(eo.new_token_ids)
        if eo.logprobs and out.logprobs is not None:
            out.logprobs.extend(eo.logprobs)
        if eo.prompt_logprobs is not None:
            out.prompt_logprobs = eo.prompt_logprobs
        if eo.seed is not None:
            out.seed = eo.seed
            out.num_cached_tokens = eo.num_cached_tokens
        delta = t.detok.step(eo.new_token_ids)
        if eo.finish_reason is not None and not t.detok.stopped:
            delta += t.detok.flush()  # releases held-back text, which may complete a stop string
        abort = False
        if t.detok.stopped:
            out.finished, out.finish_reason = True, FinishReason.STOP
            out.stop_reason = t.detok.stop_reason
            abort = eo.finish_reason is None
        elif eo.finish_reason is not None:
            out.finished, out.finish_reason = True, eo.finish_reason
        out.delta = delta
        out.text += delta
        if out.finished:
            self.tracked.pop(eo.request_id, None)
        return out, abort

    def abort(self, request_id: str) -> RequestOutput | None:
        t = self.tracked.pop(request_id, None)
        if t is None:
            return None
        t.out.delta, t.out.new_token_ids = "", []
        t.out.finished, t.out.finish_reason = True, FinishReason.ABORT
        return t.out
