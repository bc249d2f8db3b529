"""Llama family (Llama 2/3.x, SmolLM2, TinyLlama): the reference decoder the others extend.

Options the other families switch on: attention bias (Qwen2), per-head q/k RMSNorm (Qwen3),
a sliding window (Mistral).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu import CpuKernels, cpu_kernels
from tokenmill.layers import kv_int8
from tokenmill.layers.attention import AttentionBackend, AttentionMetadata
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.fused_stack import FusedStack

if TYPE_CHECKING:
    from tokenmill.lora.manager import LoraBatch


@dataclass(frozen=True)
class ArchConfig:
    """The subset of a Hugging Face config.json the decoder needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], **overrides: Any) -> ArchConfig:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers 5 folds theta and scaling here
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_scaling or rope_params
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r}")
        args: dict[str, Any] = dict(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )
        args.update(overrides)
        return cls(**args)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, backend: AttentionBackend,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [("q", q), ("k", kv), ("v", kv)],
                                     bias=cfg.attention_bias)
        self.o_proj = Linear(q, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary  # one table shared by all layers
        self.backend = backend
        self.scale = cfg.head_dim ** -0.5
        self.kv_cache = torch.empty(0)  # bound by the runner once the cache is allocated

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t, hq, hk, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, (hq + hk) * d:].view(t, hk, d)
        if self.q_norm is None and (k_rope := self._fused_rope(qkv)) is not None:
            cos, sin = self.rotary.tables(qkv.dtype)
            k_rope.rope_kv(qkv, positions, cos, sin, self.kv_cache, meta.slot_mapping, hq)
            q = qkv[:, :hq * d].view(t, hq, d)
            k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
            o = self.backend.forward(q, k, v, self.kv_cache, meta, self.scale, kv_written=True)
            return self.o_proj(o.reshape(t, -1))
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm.plain(qkv[:, :hq * d].view(t, hq, d))
            k = self.k_norm.plain(qkv[:, hq * d:(hq + hk) * d].view(t, hk, d))
            q, k = self.rotary(positions, q, k)
        else:  # q and k are adjacent columns: rotate them in one go
            q, k = self.rotary.rotate(positions, qkv[:, :(hq + hk) * d].view(t, hq + hk, d)
                                      ).split([hq, hk], dim=1)
        o = self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, -1))


    def _fused_rope(self, qkv: torch.Tensor) -> CpuKernels | None:
        """The native CPU kernel that rotates q/k in place and writes k/v into the cache in
        one call (~10 torch ops otherwise), when it takes these tensors."""
        if qkv.device.type != "cpu" or (k := cpu_kernels()) is None:
            return None
        cos, _ = self.rotary.tables(qkv.dtype)
        return k if k.supports_rope_kv(qkv, self.kv_cache, cos, self.num_heads) else None


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(
            cfg.hidden_size, [("gate", cfg.intermediate_size), ("up", cfg.intermediate_size)])
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (act := self.gate_up_proj.glu(x)) is not None:  # SiLU · up in the matmul (CPU)
            return self.down_proj(act)
        gate_up = self.gate_up_proj(x)
        if (gate_up.device.type == "cpu" and (k := cpu_kernels()) is not None
                and k.supports_silu_mul(gate_up)):  # one call (the fused stack's), not three
            return self.down_proj(k.silu_mul(gate_up))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, backend: AttentionBackend,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, backend, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name → (module name in this model, shard of the packed weight)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }

    @classmethod
    def arch_config(cls, hf_config: dict[str, Any]) -> ArchConfig:
        return ArchConfig.from_hf(hf_config)

    def __init__(self, cfg: ArchConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.backend = backend
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                 cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, rotary)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # type: ignore[assignment]
        # Steps of a w4a8 model on CPU: the layers in one native call (set when
        # the cache is bound, if the model qualifies).
        self.fused_stack: FusedStack | None = None
        # Set by the LoRA manager: its per-step plan, shared by every LoRA linear (its `plan`
        # None: no row of this step uses an adapter).
        self.lora_batch: LoraBatch | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, out_rows: list[int] | None = None) -> torch.Tensor:
        """Returns the final hidden states [T, hidden], or those of `out_rows` (ascending row
        indices: the rows that will be projected); `compute_logits` projects them. The fused
        stack then skips the other rows' work after the last layer's cache write."""
        if self.fused_stack is not None and self.fused_stack.takes(input_ids.shape[0], meta):
            return self.fused_stack.run(input_ids, positions, meta, out_rows)  # all of it
        # The kept rows' index before the layers are queued: on a GPU its copy from the host
        # would otherwise wait for them.
        keep = (torch.tensor(out_rows, dtype=torch.long, device=input_ids.device)
                if out_rows is not None and len(out_rows) < input_ids.shape[0] else None)
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        if keep is not None:
            x, residual = x[keep], None if residual is None else residual[keep]
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def kv_cache_shape(self, num_blocks: int, block_size: int,
                       dtype: torch.dtype | None = None) -> tuple[int, ...]:
        c = self.cfg
        if dtype == torch.int8:  # rows quantized into layers/kv_int8.py's layout
            return (c.num_layers, 2, c.num_kv_heads, num_blocks,
                    kv_int8.block_bytes(block_size, c.head_dim))
        return (c.num_layers, 2, c.num_kv_heads, num_blocks, block_size, c.head_dim)

    def bind_kv_cache(self, cache: torch.Tensor) -> None:
        for i, layer in enumerate(self.layers):
            layer.self_attn.kv_cache = cache[i]  # type: ignore[union-attr]
        self.fused_stack = FusedStack.build(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) in; returns the names of params loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            target, shard = name, ""
            for ckpt, (mod, shard_id) in self.packed_modules_mapping.items():
                if f".{ckpt}." in name:
                    target, shard = name.replace(f".{ckpt}.", f".{mod}."), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
            module = self.get_submodule(target.rsplit(".", 1)[0])
            if isinstance(module, Linear) and target.endswith("weight"):
                module.weight_loader(param, tensor, shard)
            elif isinstance(module, MergedLinear) or shard:
                _load_bias_shard(module, param, tensor, shard)  # type: ignore[arg-type]
            else:
                if param.shape != tensor.shape:
                    raise ValueError(f"shape mismatch for {name}: checkpoint "
                                     f"{tuple(tensor.shape)}, model {tuple(param.shape)}")
                param.data.copy_(tensor)
            loaded.add(f"{target}#{shard}")
        return loaded

    def expected_weights(self) -> set[str]:
        names: set[str] = set()
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                if name == "lm_head" and self.cfg.tie_word_embeddings:
                    continue
                for shard, _ in module.shards():
                    names.add(f"{name}.weight#{shard}")
                    if module.bias is not None:
                        names.add(f"{name}.bias#{shard}")
            elif isinstance(module, (RMSNorm, nn.Embedding)):
                names.add(f"{name}.weight#")
        return names


def _load_bias_shard(module: Linear, param: nn.Parameter, loaded: torch.Tensor,
                     shard: str) -> None:
    offset = 0
    for name, rows in module.shards():
        if name == shard:
            param.data.narrow(0, offset, rows).copy_(loaded)
            return
        offset += rows
    raise KeyError(shard)
