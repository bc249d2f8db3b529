"""Build the device side from config: resolve the model, pick device and dtype, load weights,
size and allocate the KV cache, and hand back a ready ModelRunner (or a whole EngineCore:
`build_core`, shared by the in-process `LLMEngine` and the engine process)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, WatermarkConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.guided.llg_backend import LLGuidanceBackend
from tokenmill.ipc import BatchRecorder, EngineInfo
from tokenmill.layers import kv_int8
from tokenmill.layers.attention import FLOAT8, FLOAT8_CACHES, get_attention_backend
from tokenmill.layers.dense import prepare_cpu_weights
from tokenmill.layers.quant import quantize_model
from tokenmill.loader import ModelLoadError, ModelSource, resolve_model
from tokenmill.lora.adapter import adapter_location, parse_adapter_specs
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.registry import get_model_class
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.runner.watermark import WatermarkBias
from tokenmill.runner.weight_arena import weights_in_huge_pages
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger("tokenmill.loading")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512_bf16" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def pick_device(name: str) -> torch.device:
    """The device `--device` names. A CUDA device with an index also becomes the process's
    current device: Triton kernels launch on the current device's stream whatever device
    their tensors are on, and CUDA graphs record on it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        if dev.index is not None:
            count = torch.cuda.device_count()
            if dev.index >= count:
                raise ValueError(f"--device {name}: this machine has {count} CUDA "
                                 f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
            torch.cuda.set_device(dev)
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" or cpu_has_avx512_bf16():
        return torch.bfloat16
    return torch.float32


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


# GGUF weight types whose values int4 groups of 32 hold exactly: Q4_0 (w = (q - 8) d) and
# Q4_1 (w = q d + m), both in blocks of 32 (layers/quant.py).
FOUR_BIT_GGUF_TYPES = frozenset({"Q4_0", "Q4_1"})


def checkpoint_quantize(source: ModelSource, device: torch.device,
                        dtype: str = "auto") -> str | None:
    """The quantization a checkpoint implies by itself: a GGUF whose linear layers are all
    Q4_0/Q4_1 runs them as w4a8 on a CPU with a vector kernel (AVX-512 VNNI or AVX2), the
    arithmetic llama.cpp uses for those files (4-bit weights, activations rounded to int8 per
    group of 32).
    Dequantized to bfloat16 instead, a decode step reads 4x the bytes and runs the layers one
    by one from Python (SmolLM2-135M: ~38 against ~250 tokens/s at batch 1). Not when
    `dtype` (as asked for) is float32 or float16: that asks for the dequantized weights'
    precision (the transformers oracle tests run so). Anything else (safetensors, other GGUF
    types, CUDA): None, the weights as loaded."""
    if device.type != "cpu" or source.format != "gguf" or dtype not in ("auto", "bfloat16"):
        return None
    from tokenmill.kernels.cpu import cpu_kernels
    from tokenmill.loader import read_gguf

    linear = [t.tensor_type.name for t in read_gguf(source.path).tensors
              if t.name.startswith("blk.") and len(t.shape) == 2]
    if not linear or any(name not in FOUR_BIT_GGUF_TYPES for name in linear):
        return None
    kernels = cpu_kernels()
    return "w4a8" if kernels is not None and kernels.w4a8_vector else None


def resolve_quantize(cfg: ModelConfig, source: ModelSource, device: torch.device) -> str | None:
    """`--quantize` as it applies: "none" is None, unset follows the checkpoint."""
    if cfg.quantize == "none":
        return None
    if cfg.quantize is not None:
        return cfg.quantize
    return checkpoint_quantize(source, device, cfg.dtype)


@dataclass
class LoadedModel:
    source: ModelSource
    hf_config: dict[str, Any]
    generation_config: dict[str, Any]
    model: LlamaForCausalLM
    device: torch.device
    dtype: torch.dtype
    quantize: str | None = None  # the quantization in effect (resolve_quantize)


def load_model(cfg: ModelConfig, kv_cache_dtype: str = "auto") -> LoadedModel:
    """The model on its device with its attention backend (checked for `kv_cache_dtype`'s
    cache on CUDA)."""
    source = resolve_model(cfg.model_id, revision=cfg.revision,
                           token=os.environ.get("HF_TOKEN"), weights=cfg.load_format != "dummy")
    hf_config = source.config()
    try:
        model_cls = get_model_class(hf_config)
        arch = model_cls.arch_config(hf_config)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{source.path}: {e}") from e
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    backend = get_attention_backend(cfg.attention_backend, device, kv_cache_dtype)
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(arch, backend)
    finally:
        torch.set_default_dtype(prev)
    if cfg.load_format == "dummy":
        init_dummy_weights(model, cfg.seed)
    else:
        try:
            loaded = model.load_weights(source.iter_weights())
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"{source.path}: {e}") from e
        missing = model.expected_weights() - loaded
        if missing:
            names = ", ".join(sorted(m.replace("#", ":").rstrip(":") for m in missing)[:5])
            raise ModelLoadError(f"{source.path}: checkpoint lacks {len(missing)} weights "
                                 f"({names})")
    model.eval()
    quantize = resolve_quantize(cfg, source, device)
    if quantize is not None:
        if device.type != "cpu":
            raise ModelLoadError(f"--quantize {quantize} runs on the CPU only (for now)")
        if quantize == "int4" and dtype != torch.bfloat16:
            logger.warning("--quantize int4: aten's int4 kernel is fast with bfloat16 "
                           "activations only; with %s it is correct but slow", dtype)
        n = quantize_model(model, quantize, dtype)
        if cfg.quantize is None:
            logger.info("%s: 4-bit GGUF weights run as w4a8 (int4 weights, int8 activations, "
                        "as llama.cpp computes them; --quantize none keeps %s weights): %d "
                        "linear layers", source.path.name, str(dtype).removeprefix("torch."), n)
        else:
            logger.info("%s weight-only quantization: %d linear layers", quantize, n)
    if device.type == "cpu":
        packed, dropped = prepare_cpu_weights(model)
        logger.info("CPU linear layers: %d dense weights packed, %d plain copies dropped",
                    packed, dropped)
        if os.environ.get("TOKENMILL_HUGE_PAGES", "1") != "0":
            weights_in_huge_pages(model)
        release_free_memory()
    logger.info("loaded %s (%s) on %s as %s in %.1fs", source.model_id,
                type(model).__name__, device, str(dtype).removeprefix("torch."),
                time.perf_counter() - t0)
    return LoadedModel(source, hf_config, source.generation_config(), model, device, dtype,
                       quantize)


def release_free_memory() -> None:
    """Hands the heap's free pages back to the OS (glibc's `malloc_trim`): what loading freed
    (the dequantized copies, the plain weights `prepare_cpu_weights` dropped) otherwise stays
    in the process's resident memory, glibc having raised its mmap threshold past tensor
    sizes (the default SmolLM2 server: 867 -> 664 MB). Nothing elsewhere."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """`--load-format dummy`: norms' weights 1, every other parameter N(0, 0.02^2) (biases
    0), drawn on the parameter's own device from a seeded generator."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif "norm" in name.rsplit(".", 2)[-2]:
            p.fill_(1.0)
        else:
            gen = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            p.normal_(0.0, 0.02, generator=gen)


def kv_bytes_per_token(model: LlamaForCausalLM, dtype: torch.dtype) -> float:
    c = model.cfg
    row = c.head_dim * (18 / 16 if dtype == torch.int8 else dtype.itemsize)  # int8: + scales
    return c.num_layers * 2 * c.num_kv_heads * row


def kv_cache_dtype(lm: LoadedModel, cache: CacheConfig) -> torch.dtype:
    """The cache's element type: the model's, a float8 type (`fp8_e4m3fn`, `fp8_e5m2`), or
    int8 where `--kv-cache-dtype int8` can serve this model (a clear start-up error where it
    cannot)."""
    if cache.kv_cache_dtype == "auto":
        return lm.dtype
    if cache.kv_cache_dtype in FLOAT8_CACHES:
        return FLOAT8_CACHES[cache.kv_cache_dtype]
    problem = kv_int8.unsupported(lm.model.cfg.head_dim, cache.block_size)
    if problem is not None:
        raise ModelLoadError(problem)
    return torch.int8


def num_kv_blocks(lm: LoadedModel, cache: CacheConfig) -> int:
    bs = cache.block_size
    if cache.max_batch_total_tokens is not None:
        return -(-cache.max_batch_total_tokens // bs)
    per_block = int(kv_bytes_per_token(lm.model, kv_cache_dtype(lm, cache)) * bs)
    blocks = int(_free_memory_bytes(lm.device) * cache.memory_fraction) // per_block
    if blocks < 1:
        raise RuntimeError("not enough free memory for a single KV block")
    return blocks


def load_startup_adapters(core: EngineCore, runner: ModelRunner, specs: list[str]) -> None:
    """TGI's `--lora-adapters`: read and register each adapter; any failure is a clear
    start-up error (ModelLoadError) naming the adapter, the file and the field."""
    try:
        entries = parse_adapter_specs(specs)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    for name, where in entries:
        try:
            core.register_adapter(name, runner.read_adapter(name, str(adapter_location(where))))
        except ValueError as e:  # AdapterError included
            raise ModelLoadError(f"LoRA adapter {name!r}: {e}") from e
        logger.info("LoRA adapter %r loaded from %s", name, where)


def build_runner(lm: LoadedModel, cache: CacheConfig,
                 watermark: WatermarkConfig | None = None,
                 cuda_graphs: list[int] | None = None) -> ModelRunner:
    blocks = num_kv_blocks(lm, cache)
    kv_dtype = kv_cache_dtype(lm, cache)
    if kv_dtype in FLOAT8 and lm.device.type != "cuda":
        logger.warning("--kv-cache-dtype %s on CPU: attention takes the torch path (no native "
                       "kernel reads float8), slower than auto or int8, which saves as much "
                       "memory", cache.kv_cache_dtype)
    wm = watermark or WatermarkConfig()
    runner = ModelRunner(lm.model, lm.model.backend, lm.device, blocks, cache.block_size,
                         kv_dtype, WatermarkBias(wm.watermark_gamma, wm.watermark_delta),
                         cuda_graphs=cuda_graphs,
                         max_model_len=min(lm.model.cfg.max_position_embeddings,
                                           blocks * cache.block_size))
    logger.info("KV cache: %d blocks of %d tokens (%d tokens, %s, %.2f GiB)", blocks,
                cache.block_size, blocks * cache.block_size, str(kv_dtype).removeprefix("torch."),
                blocks * cache.block_size * kv_bytes_per_token(lm.model, kv_dtype) / 2**30)
    return runner


@dataclass
class BuiltCore:
    """An engine core over a loaded model: what the engine process runs and `LLMEngine` wraps."""

    core: EngineCore
    model: LoadedModel
    runner: ModelRunner
    max_model_len: int

    @property
    def source(self) -> ModelSource:
        return self.model.source

    def engine_info(self) -> EngineInfo:
        return EngineInfo(
            model_id=self.source.model_id, max_model_len=self.max_model_len,
            vocab_size=self.model.model.cfg.vocab_size,
            dtype=str(self.model.dtype).removeprefix("torch."), device=str(self.model.device),
            num_kv_blocks=self.runner.num_blocks, block_size=self.runner.block_size,
            attention_backend=self.model.model.backend.name, pid=os.getpid(),
            adapters=list(self.core.adapters))


def _grammar_tokenizer(lm: LoadedModel) -> tuple[Tokenizer, list[int]]:
    """The model's tokenizer and EOS ids, for the grammar backend (GGUF: ~2.5 s to rebuild)."""
    from tokenmill.frontend.llm_engine import eos_token_ids, load_tokenizer

    tok = load_tokenizer(lm.source)
    return tok, eos_token_ids(lm.generation_config, lm.hf_config, tok)


def make_core(config: EngineConfig, runner: Any, num_blocks: int, block_size: int,
              max_model_len: int) -> EngineCore:
    """KV cache manager + scheduler + core around a runner (no loading)."""
    kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
    scheduler = Scheduler(config.scheduler, kv, max_model_len)
    return EngineCore(scheduler, runner, seed=config.model.seed)


def build_core(config: EngineConfig) -> BuiltCore:
    """Load the model, size the KV cache and assemble the core. Raises ModelLoadError.

    The core's runner is wrapped in a `BatchRecorder` so `ipc.collect_stats` can report the
    size of the last forward pass. No tokenizer is needed to start: requests arrive tokenized
    with their EOS ids filled in; the grammar backend loads one on its first constrained
    request.
    """
    lm = load_model(config.model, config.cache.kv_cache_dtype)
    runner = build_runner(lm, config.cache, config.watermark, config.model.cuda_graphs)
    runner.grammar = LLGuidanceBackend(partial(_grammar_tokenizer, lm), lm.model.cfg.vocab_size)
    cache_tokens = runner.num_blocks * runner.block_size
    max_len = min(lm.model.cfg.max_position_embeddings, cache_tokens,
                  config.model.max_model_len or cache_tokens)
    core = make_core(config, BatchRecorder(runner), runner.num_blocks, runner.block_size, max_len)
    load_startup_adapters(core, runner, config.model.lora_adapters)
    freeze_startup_objects()
    return BuiltCore(core, lm, runner, max_len)


def freeze_startup_objects() -> None:
    """Move what start-up made (~680k objects with SmolLM2's tokenizer and GGUF metadata) out
    of the garbage collector's sight: a full collection over them takes ~150 ms, a stall of
    every stream whenever one runs. Collections then only walk what serving allocates."""
    gc.collect()
    gc.freeze()
