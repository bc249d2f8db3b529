"""The in-process engine: tokenizer + EngineCore + OutputProcessor. The offline `LLM` drives it
directly and `AsyncLLM` runs it on a background thread."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore, Runner
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.frontend.processor import OutputProcessor
from tokenmill.protocol import EngineRequest, SamplingParams
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger("tokenmill.engine")


@dataclass
class ModelInfo:
    model_id: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    num_kv_blocks: int
    block_size: int


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, runner: Runner,
                 info: ModelInfo) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.info = info
        self.kv = KVCacheManager(info.num_kv_blocks, info.block_size,
                                 config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, info.max_model_len)
        self.core = EngineCore(self.scheduler, runner, seed=config.model.seed)
        self.processor = OutputProcessor(tokenizer)
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        from tokenmill.loader import read_gguf
        from tokenmill.runner.loading import build_runner, load_model
        from tokenmill.tokenizer import tokenizer_from_folder, tokenizer_from_gguf

        lm = load_model(config.model)
        src = lm.source
        tokenizer = (tokenizer_from_gguf(src.path, reader=read_gguf(src.path))
                     if src.format == "gguf" else tokenizer_from_folder(src.path))
        runner = build_runner(lm, config.cache)
        cache_tokens = runner.num_blocks * runner.block_size
        max_len = min(lm.model.cfg.max_position_embeddings, cache_tokens,
                      config.model.max_model_len or cache_tokens)
        info = ModelInfo(
            model_id=src.model_id, max_model_len=max_len, vocab_size=lm.model.cfg.vocab_size,
            eos_token_ids=_eos_ids(lm.generation_config, lm.hf_config, tokenizer),
            dtype=str(lm.dtype).removeprefix("torch."), device=str(lm.device),
            num_kv_blocks=runner.num_blocks, block_size=runner.block_size)
        return cls(config, tokenizer, runner, info)

    # ---- requests ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if any(not 0 <= t < self.info.vocab_size for t in prompt):
            raise ValueError(f"token ids must be in [0, {self.info.vocab_size})")
        return list(prompt)

    def prepare(self, prompt: str | list[int], params: SamplingParams | None = None,
                request_id: str | None = None, adapter_id: str | None = None) -> EngineRequest:
        """Tokenize and validate (front-end work, safe on any thread); raises ValueError."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt must contain at least one token")
        if len(ids) >= self.info.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; at most "
                             f"{self.info.max_model_len - 1} are allowed")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        return EngineRequest(request_id=rid, prompt_token_ids=ids, params=params,
                             eos_token_ids=self.info.eos_token_ids, adapter_id=adapter_id)

    def add_prepared(self, er: EngineRequest) -> None:
        self.core.add_request(er)
        self.processor.add(er.request_id, er.prompt_token_ids, er.params)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter_id: str | None = None) -> str:
        er = self.prepare(prompt, params, request_id, adapter_id)
        self.add_prepared(er)
        return er.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        self.core.abort(request_id)
        return self.processor.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.core.has_unfinished

    def step(self) -> list[RequestOutput]:
        results: list[RequestOutput] = []
        for eo in self.core.step():
            out, abort = self.processor.process(eo)
            if abort:
                self.core.abort(eo.request_id)
            if out is not None:
                results.append(out)
        return results


def _eos_ids(gen: dict[str, Any], hf: dict[str, Any], tok: Tokenizer) -> list[int]:
    """EOS ids: generation_config first (it may list several), then config, then tokenizer."""
    for source in (gen.get("eos_token_id"), hf.get("eos_token_id"), tok.eos_token_id):
        if source is None:
            continue
        return sorted({int(source)} if isinstance(source, int) else {int(x) for x in source})
    return []
