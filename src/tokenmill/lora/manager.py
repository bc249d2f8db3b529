"""Adapters resident with the model, and the per-layer stacks the linear layers read.

Each adapter gets a slot. For every (layer, projection) the manager keeps one zero-padded stack
over all slots (an adapter that does not target a projection contributes zeros there), so a
batch mixing adapters of different ranks, and rows with none, is one batched product per
projection. The runner sets the slot of every token before each forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.layers.linear import Linear
from tokenmill.lora.adapter import SUPPORTED_MODULES, LoraAdapter, load_peft_adapter
from tokenmill.lora.punica import lora_delta, stack_adapters

# checkpoint projection → (linear module in our model, shard of that linear)
PLACEMENT: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", ""),
    "gate_proj": ("mlp.gate_up_proj", "gate"), "up_proj": ("mlp.gate_up_proj", "up"),
    "down_proj": ("mlp.down_proj", ""),
}


@dataclass
class LoraBatch:
    """The adapter slot of every token in this step ([T] long, -1: base); None: no adapter."""

    token_slot: torch.Tensor | None = None


class LoraLinear:
    """Hangs off a `Linear`: the stacks of each of its shards, and the shared batch state."""

    def __init__(self, batch: LoraBatch, shards: list[tuple[str, int]]) -> None:
        self.batch = batch
        self.shards = shards
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        slot = self.batch.token_slot
        if slot is None or not self.stacks:
            return None
        parts = []
        for shard, rows in self.shards:
            st = self.stacks.get(shard)
            parts.append(lora_delta(x, slot, *st).to(x.dtype) if st is not None
                         else x.new_zeros(x.shape[0], rows))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class LoraManager:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        from tokenmill.models.llama import LlamaForCausalLM

        assert isinstance(model, LlamaForCausalLM)
        self.model = model
        self.device = device
        self.batch = LoraBatch()
        self.adapters: dict[str, LoraAdapter] = {}
        self.slots: dict[str, int] = {}
        c = model.cfg
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.module_shapes = {
            "q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv),
            "v_proj": (c.hidden_size, kv), "o_proj": (q, c.hidden_size),
            "gate_proj": (c.hidden_size, c.intermediate_size),
            "up_proj": (c.hidden_size, c.intermediate_size),
            "down_proj": (c.intermediate_size, c.hidden_size),
        }

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def load(self, name: str, path: Path) -> None:
        if name in self.slots:
            raise ValueError(f"adapter {name!r} is already loaded")
        adapter = load_peft_adapter(path, name, num_layers=self.model.cfg.num_layers,
                                    module_shapes=self.module_shapes)
        self.adapters[name] = adapter
        self.slots[name] = len(self.slots)
        self._rebuild()

    def slot_of(self, adapter_id: str | None) -> int:
        if adapter_id is None:
            return -1
        if adapter_id not in self.slots:
            raise ValueError(f"adapter {adapter_id!r} is not loaded")
        return self.slots[adapter_id]

    def set_batch(self, token_slots: list[int]) -> None:
        self.batch.token_slot = (torch.tensor(token_slots, dtype=torch.long, device=self.device)
                                 if any(s >= 0 for s in token_slots) else None)

    def _rebuild(self) -> None:
        dtype = self.model.embed_tokens.weight.dtype
        order = sorted(self.slots, key=self.slots.__getitem__)
        for layer_idx, layer in enumerate(self.model.layers):
            for proj in SUPPORTED_MODULES:
                mod_name, shard = PLACEMENT[proj]
                linear = layer.get_submodule(mod_name)
                assert isinstance(linear, Linear)
                if linear.lora is None:
                    linear.lora = LoraLinear(self.batch, linear.shards())
                triples = []
                din, dout = self.module_shapes[proj]
                for name in order:
                    w = self.adapters[name].weights.get((layer_idx, proj))
                    triples.append(w if w is not None else
                                   (torch.zeros(1, din), torch.zeros(dout, 1), 0.0))
                if all(self.adapters[n].weights.get((layer_idx, proj)) is None for n in order):
                    linear.lora.stacks.pop(shard, None)
                    continue
                r_max = max(a.shape[0] for a, _, _ in triples)
                a, b, s = stack_adapters(triples, r_max)
                linear.lora.stacks[shard] = (a.to(self.device, dtype), b.to(self.device, dtype),
                                             s.to(self.device, dtype))
