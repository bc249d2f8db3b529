"""Qwen3 (dense): the Llama decoder with per-head RMSNorm on q and k before rotary."""

from __future__ import annotations

from typing import Any

from tokenmill.models.llama import ArchConfig, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch_config(cls, hf_config: dict[str, Any]) -> ArchConfig:
        if hf_config.get("use_sliding_window"):
            raise ValueError("Qwen3 with use_sliding_window is not supported")
        return ArchConfig.from_hf(hf_config, qk_norm=True)
