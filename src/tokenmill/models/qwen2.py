"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from tokenmill.models.llama import ArchConfig, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch_config(cls, hf_config: dict[str, Any]) -> ArchConfig:
        window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
        if window is not None and hf_config.get("max_window_layers", 0) < hf_config[
                "num_hidden_layers"]:
            raise ValueError("Qwen2 with sliding window on only some layers is not supported")
        return ArchConfig.from_hf(hf_config, attention_bias=True, sliding_window=window)
