"""LoRA adapters: PEFT loading (`adapter`) and the batched mixed-adapter product (`punica`)."""

from tokenmill.lora.adapter import (
    SUPPORTED_MODULES,
    AdapterError,
    LoraAdapter,
    adapter_location,
    load_peft_adapter,
    module_name,
    parse_adapter_specs,
    resolve_adapter_path,
)
from tokenmill.lora.punica import lora_delta, lora_delta_bgmv, lora_delta_sgmv, stack_adapters

__all__ = [
    "SUPPORTED_MODULES",
    "AdapterError",
    "LoraAdapter",
    "adapter_location",
    "load_peft_adapter",
    "lora_delta",
    "lora_delta_bgmv",
    "lora_delta_sgmv",
    "module_name",
    "parse_adapter_specs",
    "resolve_adapter_path",
    "stack_adapters",
]
