"""One tree of dataclasses, built once (from the CLI or the offline API) and passed down.

Nothing here reads environment variables at import time; `EngineConfig.from_kwargs` is the
only place that turns user input into validated settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3fn", "fp8_e5m2")  # --kv-cache-dtype values
KV_CACHE_ALIASES = {"fp8": "fp8_e4m3fn", "fp8_e4m3": "fp8_e4m3fn"}  # vLLM's spellings


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    # Total KV slots (tokens) across all sequences; None: derive from memory.
    max_batch_total_tokens: int | None = None
    # Fraction of free host RAM (CPU) or free device memory (CUDA) for the KV cache.
    memory_fraction: float = 0.3
    enable_prefix_caching: bool = True
    # "auto": the model's dtype; "int8": rows quantized per group of 32 as llama.cpp's q8_0
    # (layers/kv_int8.py); TGI's "fp8_e4m3fn" / "fp8_e5m2": each value cast to that float8
    # type (saturating, scale 1, as TGI without checkpoint scales), for CUDA.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        self.kv_cache_dtype = KV_CACHE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache dtype {self.kv_cache_dtype!r}; "
                             f"available: {', '.join(KV_CACHE_DTYPES)}")
        if not 0 < self.memory_fraction <= 0.95:
            raise ValueError("memory_fraction must be in (0, 0.95]")
        if self.max_batch_total_tokens is not None and self.max_batch_total_tokens < self.block_size:
            raise ValueError("max_batch_total_tokens must hold at least one block")


@dataclass(slots=True)
class SchedulerConfig:
    # Token budget of one forward pass (prefill chunks + decodes), TGI's --max-batch-prefill-tokens.
    max_batch_prefill_tokens: int = 2048
    max_num_seqs: int = 256  # running sequences at once
    enable_chunked_prefill: bool = True
    max_active_adapters: int = 32  # LoRA adapters on the device at once (the rest in host RAM)

    def __post_init__(self) -> None:
        if self.max_batch_prefill_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("scheduler budgets must be positive")
        if self.max_active_adapters < 1:
            raise ValueError("max_active_adapters must be at least 1")


QUANTIZE_METHODS = ("int4", "w4a8")  # quantizations layers/quant.py implements
# --quantize values: "none" keeps the weights as loaded (in `dtype`) even where the
# checkpoint's own default would quantize them (runner/loading.py: `resolve_quantize`).
QUANTIZE_CHOICES = ("none", *QUANTIZE_METHODS)


@dataclass(slots=True)
class ModelConfig:
    model_id: str | None = None  # None: the embedded default model
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    attention_backend: str = "auto"
    seed: int = 0  # base seed for requests that give none
    # LoRA adapters loaded at start: "name=path" or a path (its folder name is the name).
    lora_adapters: list[str] = field(default_factory=list)
    # Quantization of the linear layers at load (CPU): None follows the checkpoint (a GGUF
    # whose linear weights are 4-bit Q4_0/Q4_1 runs them as w4a8, as llama.cpp would; any
    # other checkpoint as loaded); "none": as loaded, in `dtype`; "int4" or "w4a8".
    quantize: str | None = None
    # "dummy": random weights of the checkpoint's shapes, nothing read (benchmarks of large
    # shapes without a download: only config.json and the tokenizer are needed).
    load_format: str = "auto"
    # Decode batch sizes recorded as CUDA graphs (TGI's --cuda-graphs; [] or [0]: none). Used
    # on CUDA with the Triton attention backend.
    cuda_graphs: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])

    def __post_init__(self) -> None:
        if any(b < 0 for b in self.cuda_graphs):
            raise ValueError("cuda_graphs: batch sizes must be >= 0")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"unknown load format {self.load_format!r}; available: auto, dummy")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"unknown quantization {self.quantize!r}; "
                             f"available: {', '.join(QUANTIZE_CHOICES)}")


@dataclass(slots=True)
class ServerConfig:
    """HTTP-side settings; names follow TGI's launcher flags."""

    hostname: str = "0.0.0.0"
    port: int = 3000
    api_key: str | None = None
    cors_allow_origin: list[str] = field(default_factory=list)
    payload_limit: int = 2_000_000
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None  # None: max_total_tokens - 1
    max_total_tokens: int | None = None  # None: the engine's max model length
    max_client_batch_size: int = 4
    json_output: bool = False
    graceful_termination_timeout: float = 90.0
    engine_mode: str = "process"  # process: a separate engine process; thread: in-process
    # Roots under which LoRA adapters may be loaded at run time (none: run-time loading is off).
    lora_dynamic_dirs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.engine_mode not in ("process", "thread"):
            raise ValueError("engine_mode must be 'process' or 'thread'")
        for name in ("payload_limit", "max_concurrent_requests", "max_best_of",
                     "max_client_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")


@dataclass(slots=True)
class WatermarkConfig:
    """Kirchenbauer watermark of requests that ask for it (TGI's --watermark-gamma/-delta)."""

    watermark_gamma: float = 0.5  # fraction of the vocabulary that is green after each token
    watermark_delta: float = 2.0  # added to green logits

    def __post_init__(self) -> None:
        if not 0.0 < self.watermark_gamma < 1.0:  # also refuses NaN
            raise ValueError(f"--watermark-gamma must be > 0 and < 1, got {self.watermark_gamma}")
        if not 0.0 <= self.watermark_delta < float("inf"):
            raise ValueError(
                f"--watermark-delta must be >= 0 and finite, got {self.watermark_delta}")


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Route flat keyword arguments to the sub-config that owns them (nano-vllm style)."""
        parts: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {},
                                            "watermark": {}}
        owners = {
            name: part
            for part, klass in (("model", ModelConfig), ("cache", CacheConfig),
                                ("scheduler", SchedulerConfig), ("watermark", WatermarkConfig))
            for name in (f.name for f in dataclasses.fields(klass))
        }
        for key, value in kwargs.items():
            if key not in owners:
                raise TypeError(f"unknown engine option {key!r}")
            parts[owners[key]][key] = value
        return cls(
            model=ModelConfig(**parts["model"]),
            cache=CacheConfig(**parts["cache"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            watermark=WatermarkConfig(**parts["watermark"]),
        )
