"""Adapters held in host memory, the device slots they are copied into, and the per-layer
stacks the linear layers read.

Every adapter the engine knows lives on the host (`host`). The scheduler decides which ones
occupy the device's slots (`engine/adapters.py`) and the runner calls `activate(slot, name)` to
copy one in. Each LoRA-carrying `Linear` gets one fused stack for all of its shards (q/k/v, or
gate/up): A [S, n_shards * r, in] and a block-diagonal B [S, out, n_shards * r] with the scale
folded in, so a mixed batch costs one gathered matmul pair per linear, whatever the mix of
adapters, ranks and target modules (absent modules and ranks below r are exact zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.kernels.cpu import cpu_kernels, lora_chunks
from tokenmill.layers.linear import Linear
from tokenmill.lora.adapter import LoraAdapter, load_peft_adapter
from tokenmill.lora.punica import LoraPlan, lora_add_, make_plan

# checkpoint projection → (linear module in our model, shard of that linear)
PLACEMENT: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", ""),
    "gate_proj": ("mlp.gate_up_proj", "gate"), "up_proj": ("mlp.gate_up_proj", "up"),
    "down_proj": ("mlp.down_proj", ""),
}


@dataclass
class LoraBatch:
    """This step's grouping of tokens by adapter slot; None when no token uses an adapter."""

    plan: LoraPlan | None = None


class LoraLinear:
    """Hangs off a `Linear`: the fused stacks of its shards, and the shared batch state."""

    def __init__(self, batch: LoraBatch, shards: list[tuple[str, int]], fan_in: int) -> None:
        self.batch = batch
        self.shards = shards
        self.fan_in = fan_in
        # A [S, n_shards * rank, in] and B [S, out, n_shards * rank]; on CPU each is stored
        # transposed ([S, in, R] and [S, R, out], views): the native kernel streams rows of A^T
        # and B^T with broadcast FMAs, and the torch path's bmm takes them contiguous.
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.chunks: torch.Tensor | None = None  # the CPU kernel's column blocks

    def add_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        plan = self.batch.plan
        if plan is not None and self.a is not None and self.b is not None:
            lora_add_(y, x, plan, self.a, self.b, self.chunks)

    def resize(self, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        """(Re)allocate for `num_slots` slots of rank `rank`, keeping what is there."""
        n, out = len(self.shards), sum(rows for _, rows in self.shards)
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        if device.type == "cpu":  # stored transposed: the layout the native kernel streams
            a = zeros(num_slots, self.fan_in, n * rank).transpose(1, 2)
            b = zeros(num_slots, n * rank, out).transpose(1, 2)
        else:  # the Triton kernels' tiles read A's rows and B's rows contiguously
            a, b = zeros(num_slots, n * rank, self.fan_in), zeros(num_slots, out, n * rank)
        self.chunks = lora_chunks([rows for _, rows in self.shards], n * rank)
        if self.a is not None and self.b is not None:
            s0, r0 = self.a.shape[0], self.a.shape[1] // n
            for j in range(n):
                a[:s0, j * rank:j * rank + r0] = self.a[:, j * r0:(j + 1) * r0]
                b[:s0, :, j * rank:j * rank + r0] = self.b[:, :, j * r0:(j + 1) * r0]
        self.a, self.b = a, b

    def write(self, slot: int, parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
              ) -> None:
        """Fill `slot` with the (A, B, scale) of each targeted shard; the rest become zeros."""
        assert self.a is not None and self.b is not None
        self.a[slot].zero_()
        self.b[slot].zero_()
        rank = self.a.shape[1] // len(self.shards)
        offset = 0
        for j, (shard, rows) in enumerate(self.shards):
            if shard in parts:
                a, b, scale = parts[shard]
                r = a.shape[0]
                self.a[slot, j * rank:j * rank + r] = a
                self.b[slot, offset:offset + rows, j * rank:j * rank + r] = b * scale
            offset += rows


class LoraManager:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        from tokenmill.models.llama import LlamaForCausalLM

        assert isinstance(model, LlamaForCausalLM)
        self.model = model
        self.device = device
        self.dtype = model.embed_tokens.weight.dtype
        self.batch = LoraBatch()
        model.lora_batch = self.batch  # the fused stack takes only steps without LoRA rows
        self.host: dict[str, LoraAdapter] = {}
        self.slot_names: list[str | None] = []  # what each device slot holds
        self.rank = 0  # the block rank of the stacks: the largest rank ever activated
        c = model.cfg
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.module_shapes = {
            "q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv),
            "v_proj": (c.hidden_size, kv), "o_proj": (q, c.hidden_size),
            "gate_proj": (c.hidden_size, c.intermediate_size),
            "up_proj": (c.hidden_size, c.intermediate_size),
            "down_proj": (c.intermediate_size, c.hidden_size),
        }
        # (layer, linear module name) -> its LoraLinear once some adapter targets it
        self.linears: dict[tuple[int, str], LoraLinear] = {}

    @property
    def names(self) -> list[str]:
        return list(self.host)

    def read(self, name: str, path: Path) -> LoraAdapter:
        """Read and check an adapter (any thread: touches no shared state)."""
        if self.device.type == "cpu":
            cpu_kernels()  # build the native LoRA kernel here, not in the first step using it
        return load_peft_adapter(path, name, num_layers=self.model.cfg.num_layers,
                                 module_shapes=self.module_shapes)

    def add(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.host:
            raise ValueError(f"adapter {adapter.name!r} is already loaded")
        self.host[adapter.name] = adapter

    def load(self, name: str, path: Path) -> None:
        self.add(self.read(name, path))

    @torch.inference_mode()  # the stacks are inference tensors (made during a step)
    def remove(self, name: str) -> None:
        self.host.pop(name, None)
        for slot, held in enumerate(self.slot_names):
            if held == name:
                for ll in self.linears.values():
                    ll.write(slot, {})
                self.slot_names[slot] = None

    @torch.inference_mode()
    def activate(self, slot: int, name: str) -> None:
        """Copy adapter `name` from host memory into device slot `slot` (replacing any)."""
        adapter = self.host[name]
        by_linear: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]
        by_linear = {}
        for (layer, proj), w in adapter.weights.items():
            mod_name, shard = PLACEMENT[proj]
            by_linear.setdefault((layer, mod_name), {})[shard] = w
        if slot >= len(self.slot_names) or adapter.rank > self.rank:
            self.slot_names.extend([None] * (slot + 1 - len(self.slot_names)))
            self.rank = max(self.rank, adapter.rank)
            for ll in self.linears.values():
                ll.resize(len(self.slot_names), self.rank, self.dtype, self.device)
        for key in by_linear:
            if key not in self.linears:
                self.linears[key] = self._attach(*key)
        for key, ll in self.linears.items():
            ll.write(slot, by_linear.get(key, {}))
        self.slot_names[slot] = name

    def _attach(self, layer_idx: int, mod_name: str) -> LoraLinear:
        linear = self.model.layers[layer_idx].get_submodule(mod_name)
        assert isinstance(linear, Linear)
        ll = LoraLinear(self.batch, linear.shards(), linear.in_features)
        ll.resize(len(self.slot_names), self.rank, self.dtype, self.device)
        linear.lora = ll
        return ll

    def set_batch(self, token_slots: list[int] | None) -> None:
        """This step's plan, shared by every LoRA linear; None (or no slot used): no rows
        with an adapter. Set every step: a stale plan names rows of another batch."""
        self.batch.plan = None if token_slots is None else make_plan(token_slots, self.device)
