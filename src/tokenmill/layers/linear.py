"""Linear layers. Packed variants (QKV, gate/up) load several checkpoint tensors into one
weight so one matmul serves them; `weight_loader` knows where each shard goes. This class is
the single hook point for LoRA, quantized weights, tensor-parallel sharding and, on the CPU,
weights kept in oneDNN's own layout (`pack_cpu_weights`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.quant import QuantWeight

if TYPE_CHECKING:
    from tokenmill.lora.manager import LoraLinear

logger = logging.getLogger(__name__)


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
        # The weight reordered into oneDNN's blocked layout (`pack_cpu_weights`); `weight` then
        # holds no rows unless another module shares it (a tied LM head's embedding).
        self.packed: torch.Tensor | None = None

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
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            self.lora.add_(x, y)  # in place; nothing when no row of this batch uses an adapter
        return y


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


# Dtypes whose oneDNN matmul takes a reordered weight on any x86 CPU (float16 needs
# avx512_fp16 or avx_ne_convert).
PACKED_DTYPES = (torch.bfloat16, torch.float32)


def _onednn_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN takes a reordered weight of this dtype on this CPU and gives
    `F.linear`'s result (some builds refuse bfloat16 without AVX-512)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen).to(dtype)
    x = torch.randn(3, 64, generator=gen).to(dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError as e:
        logger.info("oneDNN's reordered %s weights unavailable here (%s): plain matmuls",
                    dtype, str(e).splitlines()[0])
        return False
    return bool(torch.allclose(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2))


def prepare_cpu_weights(model: nn.Module) -> tuple[int, int]:
    """After loading (and `quantize_model`), the plain weights of CPU `Linear` layers:

    - where the dense matmul may read it, reordered once into oneDNN's blocked layout
      (`packed`): `F.linear` reorders or reads a plain weight at every call; reordered,
      SmolLM2's matmuls of 1-64 rows run 1.1-2x faster in bfloat16 (the same bits: the same
      oneDNN kernel) and 1.1-4x in float32 (oneDNN instead of MKL's sgemm: another summation
      order, float32 rounding apart), decode steps 1.35-1.8x; benchmarks/dense_cpu.py;
    - where a quantized matmul serves every row count (w4a8), never read: dropped (an 8B
      model's would be ~14 GB of bfloat16 next to its 4-bit weights).

    The plain copy stays where another module shares it (a tied LM head's embedding).
    Returns (layers packed, plain weights dropped)."""
    onednn = (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    usable = {dt: onednn and _onednn_works(dt) for dt in PACKED_DTYPES}
    shared = {p.data_ptr() for m in model.modules() if not isinstance(m, Linear)
              for p in m.parameters(recurse=False)}
    packed = dropped = 0
    for module in model.modules():
        w = module.weight if isinstance(module, Linear) else None
        if w is None or w.device.type != "cpu" or w.dim() != 2 or w.shape[0] == 0:
            continue
        assert isinstance(module, Linear)
        if module.quant is not None and module.quant.max_rows >= 1 << 40:
            pass  # the quantized matmul takes every row: the plain weight is never read
        elif usable.get(w.dtype) and module.packed is None:
            module.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            packed += 1
        else:
            continue
        if w.data_ptr() not in shared:
            module.weight = nn.Parameter(w.new_empty(0, w.shape[1]), requires_grad=False)
            dropped += 1
    return packed, dropped
