"""The offline API: `LLM(model_id).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tokenmill.config import EngineConfig
from tokenmill.frontend.llm_engine import LLMEngine
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.protocol import SamplingParams

if TYPE_CHECKING:
    from tokenmill.models.llama import LlamaForCausalLM

Prompt = str | list[int]


class LLM:
    """Runs requests to completion in this process. Keyword arguments are `EngineConfig`
    fields (dtype, device, max_batch_total_tokens, max_batch_prefill_tokens, block_size, ...)."""

    def __init__(self, model_id: str | None = None, **kwargs: Any) -> None:
        self.config = EngineConfig.from_kwargs(model_id=model_id, **kwargs)
        self.engine = LLMEngine.from_config(self.config)
        self.tokenizer = self.engine.tokenizer

    @property
    def model(self) -> LlamaForCausalLM:
        """The loaded model, for benchmarks and tests that read its shapes or parameters."""
        model: LlamaForCausalLM = self.engine.core.runner.model  # type: ignore[attr-defined]
        return model

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(plist)
        else:
            params = list(sampling_params)
            if len(params) != len(plist):
                raise ValueError("one SamplingParams per prompt, or a single one for all")
        order = [self.engine.add_request(p, sp) for p, sp in zip(plist, params)]
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished:
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in order]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, **template_kwargs: Any,
             ) -> list[RequestOutput]:
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True,  # type: ignore[arg-type]
                                                      **template_kwargs) for c in convs]
        return self.generate([self.tokenizer.encode(p, add_special_tokens=False)
                              for p in prompts], sampling_params)
