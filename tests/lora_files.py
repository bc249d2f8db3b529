"""Synthetic PEFT LoRA adapter folders for the default model (SmolLM2-135M: hidden 576,
9 heads / 3 KV heads of 64, MLP 1536, 30 layers), written without peft for speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192),
          "o_proj": (576, 576), "gate_proj": (576, 1536), "up_proj": (576, 1536),
          "down_proj": (1536, 576)}
PARENT = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(path: Path, *, seed: int = 0, rank: int = 4,
                  targets: tuple[str, ...] = ("q_proj", "v_proj"), b_scale: float = 0.3,
                  config: dict[str, Any] | None = None, tensor_rank: int | None = None) -> Path:
    """A LoRA adapter with random non-zero A and B; `config` overrides adapter_config.json
    fields, `tensor_rank` writes tensors of another rank than the config says."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    r = tensor_rank or rank
    tensors = {}
    for layer in range(30):
        for proj in targets:
            fan_in, fan_out = SHAPES[proj]
            key = f"base_model.model.model.layers.{layer}.{PARENT.get(proj, 'self_attn')}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * b_scale
    save_file(tensors, path / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
           "target_modules": list(targets), "bias": "none", "task_type": "CAUSAL_LM",
           "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    (path / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return path
