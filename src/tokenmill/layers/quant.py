"""Weight-only quantization for CPU decode (`--quantize int4`), on aten's packed kernels.

- Decoder linears: int4, asymmetric, in groups of 32 along the input dim
  (`_weight_int4pack_mm_for_cpu`). A group w is stored as q in 0..15 with w ≈ (q - 8)·s + z,
  s = (max - min)/15 and z = min + 8·s. That is GGUF's Q4_1 block (w = q·d + m) with s = d and
  z = m + 8·d, so a Q4_1 checkpoint, dequantized at load, re-quantizes to the very blocks it
  was stored as.
- The LM head: int4 plus an int4 residual, about 8-bit accuracy. It is the layer most
  sensitive to rounding: on 68 positions of SmolLM2 a plain int4 head picked the unquantized
  head's top token 84% of the time, per-row int8 97%, int4 + residual 100%; GGUFs keep it at
  8 bits (SmolLM2's is Q8_0). aten's int8 kernel (`_weight_int8pack_mm`) is slower than two
  int4 passes.

Decode steps (few rows) read 4x (the head 2x) fewer weight bytes than bfloat16 and run
faster; at many rows the bfloat16 matmul wins (shared/notes/ecosystem.md §5), so the layer keeps
a full-precision weight and `Linear.forward` picks by row count (`QUANT_MAX_ROWS`). That weight
is overwritten with the dequantized one, so prefill and decode use the same weights and the
quantized model is exactly its dequantized reference."""

from __future__ import annotations

import abc

import torch

from tokenmill.config import QUANTIZE_METHODS

GROUP_SIZE = 32
# Rows up to which the packed kernels beat the bfloat16 matmul (SmolLM2's shapes, 2 threads:
# int4 is ~2-2.7x faster at 1 row, ~1.5x at 4, 0.6-0.8x at 16).
QUANT_MAX_ROWS = 8


class QuantWeight(abc.ABC):
    out_features: int
    in_features: int

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W^T [M, N] with the dequantized W (x in the activation dtype)."""


class Int4Weight(QuantWeight):
    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor) -> None:
        self.packed = packed  # aten's CPU int4 layout of q [N, K]
        self.scales_zeros = scales_zeros  # [K / 32, N, 2]: (s, z) per group, activation dtype
        self.in_features, self.out_features = scales_zeros.shape[0] * GROUP_SIZE, packed.shape[0]

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[Int4Weight, torch.Tensor]:
        """The packed weight, and its dequantized reference [N, K] float32: the formula applied
        to q and the scales as rounded to `dtype`, what the kernel should multiply by."""
        n, k = weight.shape
        if k % GROUP_SIZE or n % 16:
            raise ValueError(f"int4: weight {tuple(weight.shape)} needs in_features % "
                             f"{GROUP_SIZE} == 0 and out_features % 16 == 0")
        w = weight.detach().float().view(n, k // GROUP_SIZE, GROUP_SIZE)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        s = (hi - lo) / 15
        safe = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: every q is 0
        q = ((w - lo) / safe).round_().clamp_(0, 15)
        sz = torch.cat([s, lo + 8 * s], -1).to(dtype)  # [N, K/32, 2]
        reference = ((q - 8) * sz[..., :1].float() + sz[..., 1:].float()).view(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(n, k), 2)
        return cls(packed, sz.transpose(0, 1).contiguous()), reference

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_zeros)


class Int4ResidualWeight(QuantWeight):
    """int4 of the weight plus int4 of what that leaves (two passes of the int4 kernel): about
    8-bit accuracy at half the time of aten's int8 kernel (SmolLM2's head, 1 row: 1.7 ms
    against 3.2 ms; bfloat16 4.3 ms)."""

    def __init__(self, main: Int4Weight, rest: Int4Weight) -> None:
        self.main, self.rest = main, rest
        self.in_features, self.out_features = main.in_features, main.out_features

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[Int4ResidualWeight, torch.Tensor]:
        main, ref_main = Int4Weight.quantize(weight, dtype)
        rest, ref_rest = Int4Weight.quantize(weight.detach().float() - ref_main, dtype)
        return cls(main, rest), ref_main + ref_rest

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.main.matmul(x).add_(self.rest.matmul(x))


def quantize_model(model: torch.nn.Module, method: str, dtype: torch.dtype) -> int:
    """Quantize every eligible `Linear` of a loaded model in place (int4, the LM head int4 with
    an int4 residual);
    returns how many layers were quantized. CPU only."""
    from tokenmill.layers.linear import Linear

    if method not in QUANTIZE_METHODS:
        raise ValueError(f"unknown quantization {method!r}; available: {QUANTIZE_METHODS}")
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module.weight.device.type != "cpu":
            continue
        k, rows = module.in_features, module.out_features
        if k % GROUP_SIZE or rows % 16:
            continue  # an odd shape stays in full precision
        kind = Int4ResidualWeight if name == "lm_head" else Int4Weight
        module.quant, reference = kind.quantize(module.weight, dtype)
        with torch.no_grad():  # tied LM head: the embedding takes the dequantized values too
            module.weight.copy_(reference)
        n += 1
    return n
