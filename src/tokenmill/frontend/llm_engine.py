"""The in-process engine: tokenizer + EngineCore + OutputProcessor. The offline `LLM` drives it
directly and `AsyncLLM` runs it on a background thread. `InputPreparer` (tokenize + validate)
and `load_tokenizer` are shared with the multi-process client (`frontend/mp_client.py`)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore, Runner
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.frontend.outputs import RequestOutput
from tokenmill.frontend.processor import OutputProcessor
from tokenmill.protocol import EngineRequest, SamplingParams
from tokenmill.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tokenmill.ipc import EngineInfo
    from tokenmill.loader import ModelSource

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
    attention_backend: str = ""
    pid: int = 0  # the process running the model (the engine process in multi-process mode)
    adapters: list[str] = field(default_factory=list)  # LoRA adapters loaded

    @classmethod
    def from_engine_info(cls, ei: EngineInfo, eos_token_ids: list[int]) -> ModelInfo:
        return cls(model_id=ei.model_id, max_model_len=ei.max_model_len,
                   vocab_size=ei.vocab_size, eos_token_ids=list(eos_token_ids), dtype=ei.dtype,
                   device=ei.device, num_kv_blocks=ei.num_kv_blocks, block_size=ei.block_size,
                   attention_backend=ei.attention_backend, pid=ei.pid,
                   adapters=list(ei.adapters))


def check_adapter_change(info: ModelInfo, name: str, *, load: bool) -> None:
    """The front end's view of a LoRA load / unload it is about to ask for (ValueError)."""
    if not name or len(name) > 256 or any(c in name for c in "\x00\n\r"):
        raise ValueError("invalid adapter name")
    if name == info.model_id:
        raise ValueError(f"'{name}' is the base model's id")
    if load and name in info.adapters:
        raise ValueError(f"adapter '{name}' is already loaded")
    if not load and name not in info.adapters:
        raise LookupError(f"adapter '{name}' is not loaded")


def load_tokenizer(source: ModelSource) -> Tokenizer:
    """The tokenizer of a resolved model (GGUF metadata or the folder's tokenizer files)."""
    from tokenmill.loader import read_gguf
    from tokenmill.tokenizer import tokenizer_from_folder, tokenizer_from_gguf

    return (tokenizer_from_gguf(source.path, reader=read_gguf(source.path))
            if source.format == "gguf" else tokenizer_from_folder(source.path))


class InputPreparer:
    """Front-end request preparation: tokenize, validate, fill in EOS ids (any thread)."""

    def __init__(self, tokenizer: Tokenizer, info: ModelInfo, id_prefix: str = "req-") -> None:
        self.tokenizer = tokenizer
        self.info = info
        self._prefix = id_prefix
        self._ids = itertools.count()

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if any(not 0 <= t < self.info.vocab_size for t in prompt):
            raise ValueError(f"token ids must be in [0, {self.info.vocab_size})")
        return list(prompt)

    def prepare(self, prompt: str | list[int], params: SamplingParams | None = None,
                request_id: str | None = None, adapter_id: str | None = None) -> EngineRequest:
        """Tokenize and validate; raises ValueError with a user-facing message."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt must contain at least one token")
        if len(ids) >= self.info.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; at most "
                             f"{self.info.max_model_len - 1} are allowed")
        if adapter_id is not None and adapter_id not in self.info.adapters:
            raise ValueError(f"adapter {adapter_id!r} is not loaded")
        rid = request_id if request_id is not None else f"{self._prefix}{next(self._ids)}"
        return EngineRequest(request_id=rid, prompt_token_ids=ids, params=params,
                             eos_token_ids=self.info.eos_token_ids, adapter_id=adapter_id)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, runner: Runner,
                 info: ModelInfo, *, core: EngineCore | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.info = info
        if core is None:
            kv = KVCacheManager(info.num_kv_blocks, info.block_size,
                                config.cache.enable_prefix_caching)
            core = EngineCore(Scheduler(config.scheduler, kv, info.max_model_len), runner,
                              seed=config.model.seed)
        self.core = core
        self.scheduler = core.scheduler
        self.kv = core.scheduler.kv
        self.processor = OutputProcessor(tokenizer)
        self.inputs = InputPreparer(tokenizer, info)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        from tokenmill.runner.loading import build_core

        built = build_core(config)
        lm = built.model
        tokenizer = load_tokenizer(built.source)
        info = ModelInfo.from_engine_info(
            built.engine_info(), eos_token_ids(lm.generation_config, lm.hf_config, tokenizer))
        return cls(config, tokenizer, built.runner, info, core=built.core)

    # ---- requests ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.inputs.encode(prompt)

    def prepare(self, prompt: str | list[int], params: SamplingParams | None = None,
                request_id: str | None = None, adapter_id: str | None = None) -> EngineRequest:
        """Tokenize and validate (front-end work, safe on any thread); raises ValueError."""
        return self.inputs.prepare(prompt, params, request_id, adapter_id)

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

    # ---- LoRA adapters (synchronous; the async engines load off the loop's thread) -------
    def load_adapter(self, name: str, path: str) -> None:
        check_adapter_change(self.info, name, load=True)
        runner: Any = self.core.runner
        self.core.register_adapter(name, runner.read_adapter(name, path))
        self.info.adapters.append(name)

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for `name`; it is dropped once its requests finish."""
        check_adapter_change(self.info, name, load=False)
        self.info.adapters.remove(name)
        self.core.unload_adapter(name, lambda error: None)
        self.core.poll_adapters()

    @property
    def has_unfinished(self) -> bool:
        return self.core.has_unfinished

    def step(self) -> list[RequestOutput]:
        self.core.poll_adapters()
        results: list[RequestOutput] = []
        for eo in self.core.step():
            out, abort = self.processor.process(eo)
            if abort:
                self.core.abort(eo.request_id)
            if out is not None:
                results.append(out)
        return results


def eos_token_ids(gen: dict[str, Any], hf: dict[str, Any], tok: Tokenizer) -> list[int]:
    """EOS ids: generation_config first (it may list several), then config, then tokenizer."""
    for source in (gen.get("eos_token_id"), hf.get("eos_token_id"), tok.eos_token_id):
        if source is None:
            continue
        return sorted({int(source)} if isinstance(source, int) else {int(x) for x in source})
    return []


_eos_ids = eos_token_ids  # the old private name
