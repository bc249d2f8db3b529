"""Mistral: the Llama decoder with an optional sliding attention window."""

from __future__ import annotations

from typing import Any

from tokenmill.models.llama import ArchConfig, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch_config(cls, hf_config: dict[str, Any]) -> ArchConfig:
        return ArchConfig.from_hf(hf_config, sliding_window=hf_config.get("sliding_window"))
