"""`architectures[0]` in config.json → model class."""

from __future__ import annotations

from typing import Any

from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.mistral import MistralForCausalLM
from tokenmill.models.qwen2 import Qwen2ForCausalLM
from tokenmill.models.qwen3 import Qwen3ForCausalLM

_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(hf_config: dict[str, Any]) -> type[LlamaForCausalLM]:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise ValueError(f"unsupported architecture {archs or hf_config.get('model_type')!r}; "
                     f"supported: {', '.join(supported_architectures())}")
