"""Linear layers. Packed variants (QKV, gate/up) load several checkpoint tensors into one
weight so one matmul serves them; `weight_loader` knows where each shard goes. This class is
the single hook point for LoRA, quantized weights, tensor-parallel sharding and, on the CPU,
dense weights kept in a packed layout (layers/dense.py `prepare_cpu_weights`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.quant import QuantWeight

if TYPE_CHECKING:
    from tokenmill.layers.dense import PackedWeight
    from tokenmill.lora.manager import LoraLinear


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features), requires_grad=False)
                     if bias else None)
        self.lora: LoraLinear | None = None  # set by the LoRA manager when adapters load
        self.quant: QuantWeight | None = None  # set by `quantize_model` (--quantize)
        # The weight in a layout made for its matmul (layers/dense.py); `weight` then holds no
        # rows unless another module shares it (a tied LM head's embedding).
        self.packed: PackedWeight | None = None

    # Ordered (shard name, number of output rows); one shard for a plain layer.
    def shards(self) -> list[tuple[str, int]]:
        return [("", self.out_features)]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str = "") -> None:
        offset = 0
        for name, rows in self.shards():
            if name == shard:
                target = param.data.narrow(0, offset, rows)
                if target.shape != loaded.shape:
                    raise ValueError(f"shape mismatch for shard {shard or 'weight'}: "
                                     f"checkpoint {tuple(loaded.shape)}, model {tuple(target.shape)}")
                target.copy_(loaded)
                return
            offset += rows
        raise KeyError(f"unknown shard {shard!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None and x.shape[:-1].numel() <= self.quant.max_rows:
            # few rows: weight bytes dominate, read fewer of them
            y = self.quant.matmul(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]))
            if x.dim() != 2:
                y = y.view(*x.shape[:-1], y.shape[-1])
            if self.bias is not None:
                y += self.bias
        elif self.packed is not None:
            y = self.packed.matmul(x, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            self.lora.add_(x, y)  # in place; nothing when no row of this batch uses an adapter
        return y


    def glu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of a [gate | up] layer (`MergedLinear` of two equal halves) in one
        native pass, the matmul's SiLU epilogue: the bits of `forward` then the SiLU · up
        kernel. None where that does not apply (a bias, LoRA, halves that are not whole
        16-column tiles, a weight kind without it): the caller takes the two steps."""
        if self.bias is not None or self.lora is not None or self.out_features % 32:
            return None
        rows = x.reshape(-1, x.shape[-1])
        if self.quant is not None and rows.shape[0] <= self.quant.max_rows:
            fused = getattr(self.quant, "glu", None)
        else:
            fused = getattr(self.packed, "glu", None)
        if fused is None:
            return None
        y = fused(rows)
        return y.view(*x.shape[:-1], y.shape[-1])

    def dense_weight(self) -> torch.Tensor:
        """The weight [out, in] in the plain layout, whichever form the layer keeps it in."""
        if self.weight.shape[0]:
            return self.weight
        if self.packed is not None:
            return self.packed.to_dense()
        assert self.quant is not None, "a layer without its weight"
        return self.quant.dequantize().to(self.weight.dtype)


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output dim (qkv, gate_up)."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], bias: bool = False):
        super().__init__(in_features, sum(rows for _, rows in parts), bias)
        self._parts = parts

    def shards(self) -> list[tuple[str, int]]:
        return self._parts

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split([rows for _, rows in self._parts], dim=-1))
