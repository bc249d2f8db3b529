"""Weight-only quantization for CPU decode (`--quantize int4`), on aten's packed kernels.

- Decoder linears: int4, asymmetric, in groups of 32 along the input dim
  (`_weight_int4pack_mm_for_cpu`). A group w is stored as q in 0..15 with w ≈ (q - 8)·s + z,
  s = (max - min)/15 and z = min + 8·s. That is GGUF's Q4_1 block (w = q·d + m) with s = d and
  z = m + 8·d, so a Q4_1 checkpoint, dequantized at load, re-quantizes to the very blocks it
  was stored as.
- The LM head: int8, symmetric per output row (`_weight_int8pack_mm`). It is the layer most
  sensitive to rounding, and GGUFs keep it at 8 bits (SmolLM2's is Q8_0).

Decode steps (few rows) read 4x (2x) fewer weight bytes than bfloat16 and run several times
faster; at many rows the bfloat16 matmul wins (shared/notes/ecosystem.md §5), so the layer keeps
a full-precision weight and `Linear.forward` picks by row count (`QUANT_MAX_ROWS`). That weight
is overwritten with the dequantized one, so prefill and decode use the same weights and the
quantized model is exactly its dequantized reference."""

from __future__ import annotations

import abc

import torch

GROUP_SIZE = 32
# Rows up to which the packed kernels beat the bfloat16 matmul (SmolLM2's shapes, 2 threads:
# int4 is ~2-2.7x faster at 1 row, ~1.5x at 4, 0.6-0.8x at 16).
QUANT_MAX_ROWS = 8
QUANTIZE_METHODS = ("int4",)


class QuantWeight(abc.ABC):
    out_features: int
    in_features: int

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W^T [M, N] with the dequantized W (x in the activation dtype)."""

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the kernel multiplies by, [N, K]."""
        eye = torch.eye(self.in_features, dtype=dtype)
        return self.matmul(eye).t().contiguous()


class Int4Weight(QuantWeight):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        n, k = weight.shape
        if k % GROUP_SIZE or n % 16:
            raise ValueError(f"int4: weight {tuple(weight.shape)} needs in_features % "
                             f"{GROUP_SIZE} == 0 and out_features % 16 == 0")
        w = weight.detach().float().view(n, k // GROUP_SIZE, GROUP_SIZE)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        s = (hi - lo) / 15
        safe = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: every q is 0
        q = ((w - lo) / safe).round_().clamp_(0, 15).to(torch.int32).view(n, k)
        self.scales_zeros = (torch.cat([s, lo + 8 * s], -1).transpose(0, 1).contiguous()
                             .to(dtype))  # [K / 32, N, 2]
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        self.out_features, self.in_features = n, k

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_zeros)


class Int8Weight(QuantWeight):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        w = weight.detach().float()
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        self.q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous()
        self.scales = scale.to(dtype)
        self.out_features, self.in_features = w.shape

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.q, self.scales)


def quantize_model(model: torch.nn.Module, method: str, dtype: torch.dtype) -> int:
    """Quantize every eligible `Linear` of a loaded model in place (int4, the LM head int8);
    returns how many layers were quantized. CPU only."""
    from tokenmill.layers.linear import Linear

    if method not in QUANTIZE_METHODS:
        raise ValueError(f"unknown quantization {method!r}; available: {QUANTIZE_METHODS}")
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module.weight.device.type != "cpu":
            continue
        k, rows = module.in_features, module.out_features
        qw: QuantWeight
        if name == "lm_head":
            qw = Int8Weight(module.weight, dtype)
        elif k % GROUP_SIZE == 0 and rows % 16 == 0:
            qw = Int4Weight(module.weight, dtype)
        else:
            continue  # an odd shape stays in full precision
        module.quant = qw
        with torch.no_grad():  # tied LM head: the embedding takes the int8 values too
            module.weight.copy_(qw.dequantize(dtype))
        n += 1
    return n
