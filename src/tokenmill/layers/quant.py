"""Weight-only quantization for CPU decode (`--quantize int4`, `--quantize w4a8`).

- Decoder linears: int4, asymmetric, in groups of 32 along the input dim. A group w is stored
  as q in 0..15 with w ≈ (q - 8)·s + z, s = (max - min)/15 and z = min + 8·s. That is GGUF's
  Q4_1 block (w = q·d + m) with s = d and z = m + 8·d, so a Q4_1 checkpoint, dequantized at
  load, re-quantizes to the very blocks it was stored as.
- The LM head: int4 plus an int4 residual, about 8-bit accuracy. It is the layer most
  sensitive to rounding: on 68 positions of SmolLM2 a plain int4 head picked the unquantized
  head's top token 84% of the time, per-row int8 97%, int4 + residual 100%; GGUFs keep it at
  8 bits (SmolLM2's is Q8_0). aten's int8 kernel (`_weight_int8pack_mm`) is slower than two
  int4 passes.

`int4` multiplies bfloat16 activations on aten's packed kernel
(`_weight_int4pack_mm_for_cpu`). Decode steps (few rows) read 4x (the head 2x) fewer weight
bytes than bfloat16 and run faster; at many rows the bfloat16 matmul wins
(shared/notes/ecosystem.md §5), so the layer keeps a full-precision weight and
`Linear.forward` picks by row count (`max_rows`). That weight is overwritten with the
dequantized one, so prefill and decode use the same weights and the quantized model is
exactly its dequantized reference.

`w4a8` has the same weights but also quantizes the activations, per row and group of 32, to
int8 (llama.cpp's Q4_1 x Q8_1 arithmetic), and multiplies with integer dot products in a
native kernel (kernels/csrc/w4a8.cpp): a different, slightly less exact numerics, so
opt-in, except for a GGUF whose linear layers are Q4_0/Q4_1 on a CPU (unless float32 or
float16 is asked for): such a file is made for this arithmetic, and gets it by default
(runner/loading.py `checkpoint_quantize`; `--quantize none` keeps the dequantized weights).
"""

from __future__ import annotations

import abc
import logging
from typing import ClassVar

import torch

from tokenmill.config import QUANTIZE_METHODS
from tokenmill.kernels.cpu import W4A8_GROUP, W4A8_TILE, CpuKernels, cpu_kernels

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
assert GROUP_SIZE == W4A8_GROUP
RESIDUAL_MAX_ROWS = 32


class QuantWeight(abc.ABC):
    out_features: int
    in_features: int
    max_rows: int  # steps of more rows use the dequantized weight (`Linear.forward`)

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W^T [M, N] with the dequantized W (x in the activation dtype)."""

    def dequantize(self) -> torch.Tensor:
        """The dequantized weight [N, K] float32, where the layout can be read back."""
        raise NotImplementedError(f"{type(self).__name__} keeps no readable weight")


def int4_groups(weight: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q int32 [N, K] in 0..15, (s, z) [N, K/32, 2] in `dtype`, and the dequantized reference
    [N, K] float32: the formula applied to q and the scales as rounded to `dtype`."""
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
    return q.to(torch.int32).view(n, k), sz, reference


class Int4Weight(QuantWeight):
    # Rows up to which aten's kernel beats the bfloat16 matmul (SmolLM2's shapes, 2 threads:
    # ~2-2.7x faster at 1 row, ~1.5x at 4, 0.6-0.8x at 16).
    max_rows = 8

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor) -> None:
        self.packed = packed  # aten's CPU int4 layout of q [N, K]
        self.scales_zeros = scales_zeros  # [K / 32, N, 2]: (s, z) per group, activation dtype
        self.in_features, self.out_features = scales_zeros.shape[0] * GROUP_SIZE, packed.shape[0]

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[Int4Weight, torch.Tensor]:
        """The packed weight, and its dequantized reference [N, K] float32 (`int4_groups`),
        what the kernel should multiply by."""
        q, sz, reference = int4_groups(weight, dtype)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        return cls(packed, sz.transpose(0, 1).contiguous()), reference

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_zeros)


class NativeQuantWeight(QuantWeight):
    """Weights for the native int8-activation kernels (kernels/csrc/w4a8.cpp): packed bytes
    [N/16, K/32, tile_bytes] in 16-row tiles and groups of 32, and their scales."""

    # Every step: the kernels beat the bfloat16 matmul at any row count on SmolLM2's layers
    # (2.4x at 1 row ... 1.4x at 512, benchmarks/int4_kernels.py), so prefill and decode
    # share the quantized numerics, as in llama.cpp.
    max_rows = 1 << 62
    tile_bytes: ClassVar[int]
    scale_dtype: ClassVar[torch.dtype]

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, kernels: CpuKernels) -> None:
        tiles, groups, size = packed.shape
        assert packed.dtype == torch.uint8 and size == self.tile_bytes
        assert scales.dtype == self.scale_dtype and scales.shape[:3] == (tiles, groups, W4A8_TILE)
        self.packed, self.scales = packed.contiguous(), scales.contiguous()
        self.kernels = kernels
        self.out_features, self.in_features = tiles * W4A8_TILE, groups * GROUP_SIZE

    @staticmethod
    def _native(what: str) -> CpuKernels:
        kernels = cpu_kernels()
        if kernels is None:
            raise RuntimeError(f"{what} needs the native CPU kernels (a C++ compiler)")
        return kernels

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Cheap checks only (~120 calls a decode step); the layers are CPU-only (load_model).
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: cannot multiply {tuple(x.shape)} by "
                             f"[{self.out_features}, {self.in_features}]^T")
        return self._multiply(x if x.stride(1) == 1 else x.contiguous())

    @abc.abstractmethod
    def _multiply(self, x: torch.Tensor) -> torch.Tensor: ...


class W4A8Weight(NativeQuantWeight):
    """The int4 groups repacked for the int4 x int8 kernel (`CpuKernels.w4a8_matmul`); the
    scales are bfloat16 (s, z) pairs whatever the model's dtype."""

    tile_bytes, scale_dtype = W4A8_TILE * GROUP_SIZE // 2, torch.bfloat16

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[W4A8Weight, torch.Tensor]:
        kernels = cls._native("w4a8")
        q, sz, reference = int4_groups(weight, torch.bfloat16)
        return cls(*cls.pack(q, sz), kernels), reference

    @staticmethod
    def pack(q: torch.Tensor, sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [N, K] in 0..15 and (s, z) [N, K/32, 2] -> the kernel's layout (see its source):
        uint8 [N/16, K/32, 256] where byte (j, r, i) holds k = 4j + i of row r in its low
        nibble and k = 16 + 4j + i in its high one, and bfloat16 [N/16, K/32, 16, 2]."""
        n, k = q.shape
        t, g = n // W4A8_TILE, k // GROUP_SIZE
        v = q.to(torch.uint8).view(t, W4A8_TILE, g, 2, 4, 4)  # tile, r, group, half, j, i
        v = v.permute(0, 2, 4, 1, 5, 3)  # tile, group, j, r, i, half
        packed = (v[..., 0] | (v[..., 1] << 4)).reshape(t, g, W4A8_TILE * GROUP_SIZE // 2)
        scales = sz.to(torch.bfloat16).view(t, W4A8_TILE, g, 2).permute(0, 2, 1, 3)
        return packed.contiguous(), scales.contiguous()

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.w4a8_matmul(x, self.packed, self.scales)

    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this [gate | up] weight's product in one pass (the kernel's
        SiLU epilogue): `silu_mul(matmul(x))` bit for bit, without the [M, N] product."""
        if x.dim() != 2 or x.shape[1] != self.in_features or self.out_features % 32:
            raise ValueError(f"W4A8Weight.glu: {tuple(x.shape)} by "
                             f"[{self.out_features}, {self.in_features}]^T")
        return self.kernels.w4a8_glu(x if x.stride(1) == 1 else x.contiguous(), self.packed,
                                     self.scales)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] float32 from the packed layout: `pack` undone, then
        (q - 8) * s + z, the reference `quantize` returned."""
        t, g, _ = self.packed.shape
        p = self.packed.view(t, g, 4, W4A8_TILE, 4)  # tile, group, j, r, i
        v = torch.stack([p & 0x0F, p >> 4], -1)  # tile, group, j, r, i, half
        q = v.permute(0, 3, 1, 5, 2, 4).reshape(self.out_features, self.in_features).float()
        sz = self.scales.permute(0, 2, 1, 3).reshape(self.out_features, g, 1, 2).float()
        w = (q.view(self.out_features, g, GROUP_SIZE) - 8) * sz[..., 0] + sz[..., 1]
        return w.view(self.out_features, self.in_features)


class W8A8Weight(NativeQuantWeight):
    """int8 weights, symmetric per group of 32 (w = d·q, q in -127..127, d float32: GGUF's
    Q8_0), times int8 activations (`CpuKernels.w8a8_matmul`): the LM head of a w4a8 model, in
    one pass where int4 + an int4 residual took two."""

    tile_bytes, scale_dtype = W4A8_TILE * GROUP_SIZE, torch.float32

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[W8A8Weight, torch.Tensor]:
        kernels = cls._native("w8a8")
        n, k = weight.shape
        if k % GROUP_SIZE or n % W4A8_TILE:
            raise ValueError(f"int8: weight {tuple(weight.shape)} needs in_features % "
                             f"{GROUP_SIZE} == 0 and out_features % {W4A8_TILE} == 0")
        w = weight.detach().float().view(n, k // GROUP_SIZE, GROUP_SIZE)
        d = w.abs().amax(-1) / 127
        safe = torch.where(d > 0, d, torch.ones_like(d))
        q = (w / safe.unsqueeze(-1)).round_().clamp_(-127, 127)
        reference = (q * d.unsqueeze(-1)).view(n, k)
        return cls(*cls.pack(q.to(torch.int32).view(n, k), d), kernels), reference

    @staticmethod
    def pack(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [N, K] in -127..127 and d [N, K/32] -> the kernel's layout: uint8
        [N/16, K/32, 512] where byte (c, r, i) holds q + 128 of row r at k = 4c + i, and
        float32 [N/16, K/32, 16]."""
        n, k = q.shape
        t, g = n // W4A8_TILE, k // GROUP_SIZE
        v = (q + 128).to(torch.uint8).view(t, W4A8_TILE, g, 8, 4).permute(0, 2, 3, 1, 4)
        packed = v.reshape(t, g, W4A8_TILE * GROUP_SIZE)
        scales = d.float().view(t, W4A8_TILE, g).permute(0, 2, 1)
        return packed.contiguous(), scales.contiguous()

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.w8a8_matmul(x, self.packed, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] float32: `pack` undone, then q * d."""
        t, g, _ = self.packed.shape
        v = self.packed.view(t, g, 8, W4A8_TILE, 4).permute(0, 3, 1, 2, 4)  # t, r, g, c, i
        q = v.reshape(self.out_features, g, GROUP_SIZE).float() - 128
        d = self.scales.permute(0, 2, 1).reshape(self.out_features, g, 1)
        return (q * d).view(self.out_features, self.in_features)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The w4a8 kernel's activation rounding in torch (for tests and references): x [M, K] ->
    (a8 [M, K] float32 integers in -127..127, d [M, K/32] float32), x ≈ a8 · d per group."""
    m, k = x.shape
    xf = x.float().view(m, k // GROUP_SIZE, GROUP_SIZE)
    d = xf.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    a8 = (xf * inv.unsqueeze(-1)).round().clamp(-127, 127)
    return a8.view(m, k), d


class ResidualWeight(QuantWeight):
    """int4 of the weight plus int4 of what that leaves (two passes of the kernel): about
    8-bit accuracy at half the time of aten's int8 kernel (SmolLM2's head, 1 row: 1.7 ms
    against 3.2 ms; bfloat16 4.3 ms)."""

    def __init__(self, main: QuantWeight, rest: QuantWeight) -> None:
        self.main, self.rest = main, rest
        self.in_features, self.out_features = main.in_features, main.out_features

    @property
    def max_rows(self) -> int:  # type: ignore[override]  # the main pass's (tests patch it)
        # Two passes: past ~32 rows the bfloat16 matmul is faster (SmolLM2's head with the
        # w4a8 kernel: 2 x 3.2 ms against 7.1 ms at 32 rows, 2 x 6.6 against 11.3 at 64).
        return min(self.main.max_rows, RESIDUAL_MAX_ROWS)

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype,
                 kind: type[Int4Weight] | type[W4A8Weight] = Int4Weight
                 ) -> tuple[ResidualWeight, torch.Tensor]:
        main, ref_main = kind.quantize(weight, dtype)
        rest, ref_rest = kind.quantize(weight.detach().float() - ref_main, dtype)
        return cls(main, rest), ref_main + ref_rest

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.main.matmul(x).add_(self.rest.matmul(x))

    def dequantize(self) -> torch.Tensor:
        return self.main.dequantize() + self.rest.dequantize()


def quantize_model(model: torch.nn.Module, method: str, dtype: torch.dtype) -> int:
    """Quantize every eligible `Linear` of a loaded model in place (int4: the LM head int4 with
    an int4 residual; w4a8: the LM head int8); returns how many layers were quantized. CPU
    only. w4a8 without the native kernels (no compiler) falls back to int4, with a warning."""
    from tokenmill.layers.linear import Linear

    if method not in QUANTIZE_METHODS:
        raise ValueError(f"unknown quantization {method!r}; available: {QUANTIZE_METHODS}")
    kind: type[Int4Weight] | type[W4A8Weight] = Int4Weight
    if method == "w4a8":
        if cpu_kernels() is not None:
            kind = W4A8Weight
        else:
            logger.warning("--quantize w4a8 needs the native CPU kernels; using int4")
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module.weight.device.type != "cpu":
            continue
        k, rows = module.in_features, module.out_features
        if k % GROUP_SIZE or rows % 16:
            continue  # an odd shape stays in full precision
        if name == "lm_head" and kind is W4A8Weight:
            module.quant, reference = W8A8Weight.quantize(module.weight, dtype)
        elif name == "lm_head":
            module.quant, reference = ResidualWeight.quantize(module.weight, dtype, kind)
        else:
            module.quant, reference = kind.quantize(module.weight, dtype)
        with torch.no_grad():  # tied LM head: the embedding takes the dequantized values too
            module.weight.copy_(reference)
        n += 1
    return n
