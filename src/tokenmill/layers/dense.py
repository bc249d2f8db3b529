"""Dense (unquantized) CPU weights in a layout made for their matmul, chosen once after loading
by `prepare_cpu_weights` (runner/loading.py calls it), kept as `Linear.packed`:

- `TiledWeight`: tokenmill's layout and kernel (kernels/csrc/dense.cpp): 16-column tiles whose
  weights stream once per block of rows, each output's products summed in k order whatever
  the batch, so every row gets the same bits alone as in any batch. On SmolLM2's shapes
  (benchmarks/dense_cpu.py, Zen 4): bfloat16 1.4-2.4x oneDNN's matmul at 1 row, 1.1-1.5x at
  16-64, the same at 512; float32 1.3-1.65x at 1 row, ~1x from 16 rows. Needs the native
  kernels, N a multiple of 16 and, in bfloat16, an even K.
- `OneDnnWeight`: elsewhere (no compiler, other shapes), the weight reordered once into
  oneDNN's blocked layout, which `F.linear` would redo or read plain at every call
  (bfloat16: the same bits as `F.linear`; float32: oneDNN's sums instead of MKL's).

Layers whose quantized matmul serves every row count (w4a8) drop the plain weight instead.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tokenmill.kernels.cpu import CpuKernels, cpu_kernels
from tokenmill.layers.linear import Linear

logger = logging.getLogger(__name__)

# Dtypes with a packed path on any x86 CPU (float16 would need avx512_fp16 or avx_ne_convert).
PACKED_DTYPES = (torch.bfloat16, torch.float32)
TILE = 16  # output columns per tile (dense.cpp)


class TiledWeight:
    """W [N, K] as dense.cpp reads it: [N/16, K/2, 16, 2] (bfloat16: a tile's k pairs, the
    operand of vdpbf16ps) or [N/16, K, 16] (float32)."""

    def __init__(self, weight: torch.Tensor, kernels: CpuKernels) -> None:
        assert self.fits(weight)
        n, k = weight.shape
        self.kernels = kernels
        self.out_features, self.in_features, self.dtype = n, k, weight.dtype
        w = weight.detach()
        if w.dtype == torch.bfloat16:
            self.tiles = w.reshape(n // TILE, TILE, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        else:
            self.tiles = w.reshape(n // TILE, TILE, k).permute(0, 2, 1).contiguous()

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        n, k = weight.shape
        return (weight.dtype in PACKED_DTYPES and n > 0 and k > 0 and n % TILE == 0
                and (weight.dtype != torch.bfloat16 or k % 2 == 0))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] @ W^T (+ bias: added to the rounded product, as the fused stack does)."""
        if x.dtype != self.dtype or x.shape[-1] != self.in_features:
            raise ValueError(f"input {tuple(x.shape)} {x.dtype} for a {self.dtype} weight "
                             f"[{self.out_features}, {self.in_features}]")
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] and rows.stride(-1) != 1:
            rows = rows.contiguous()
        y = self.kernels.dense_matmul(rows, self.tiles, self.out_features)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], self.out_features)

    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this [gate | up] weight's product in one pass (the kernel's
        SiLU epilogue): pointwise SiLU · up of `matmul(x)` bit for bit. x [M, K]."""
        if (x.dtype != self.dtype or x.dim() != 2 or x.shape[1] != self.in_features
                or self.out_features % (2 * TILE)):
            raise ValueError(f"TiledWeight.glu: {tuple(x.shape)} {x.dtype} by a {self.dtype} "
                             f"[{self.out_features}, {self.in_features}] weight")
        if x.shape[0] and x.stride(1) != 1:
            x = x.contiguous()
        return self.kernels.dense_glu(x, self.tiles, self.out_features)

    def to_dense(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.dtype == torch.bfloat16:
            return self.tiles.permute(0, 2, 1, 3).reshape(n, k)
        return self.tiles.permute(0, 2, 1).reshape(n, k)


class OneDnnWeight:
    """W reordered into oneDNN's blocked layout for `mkldnn._linear_pointwise`."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.reordered, bias, "none", [], "")

    def to_dense(self) -> torch.Tensor:
        return self.reordered.to_dense()


PackedWeight = TiledWeight | OneDnnWeight


def _onednn_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN takes a reordered weight of this dtype on this CPU and gives
    `F.linear`'s result (some builds refuse bfloat16 without AVX-512)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen).to(dtype)
    x = torch.randn(3, 64, generator=gen).to(dtype)
    try:
        y = OneDnnWeight(w).matmul(x, None)
    except RuntimeError as e:
        logger.info("oneDNN's reordered %s weights unavailable here (%s): plain matmuls",
                    dtype, str(e).splitlines()[0])
        return False
    return bool(torch.allclose(y.float(), torch.nn.functional.linear(x, w).float(),
                               rtol=2e-2, atol=2e-2))


def prepare_cpu_weights(model: nn.Module, tiled: bool = True) -> tuple[int, int]:
    """After loading (and `quantize_model`), the plain weights of CPU `Linear` layers:

    - where the dense matmul may read it: packed once (`TiledWeight` where the native kernels
      are loaded and `tiled`, else `OneDnnWeight` where oneDNN takes the dtype);
    - where a quantized matmul serves every row count (w4a8), never read: dropped (an 8B
      model's would be ~14 GB of bfloat16 next to its 4-bit weights).

    The plain copy stays where another module shares it (a tied LM head's embedding).
    Returns (layers packed, plain weights dropped)."""
    kernels = cpu_kernels() if tiled else None
    onednn: dict[torch.dtype, bool] = {}
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
        elif module.packed is not None or w.dtype not in PACKED_DTYPES:
            continue
        elif kernels is not None and TiledWeight.fits(w):
            module.packed = TiledWeight(w, kernels)
            packed += 1
        elif onednn.setdefault(w.dtype, _onednn_works(w.dtype)):
            module.packed = OneDnnWeight(w)
            packed += 1
        else:
            continue
        if w.data_ptr() not in shared:
            module.weight = nn.Parameter(w.new_empty(0, w.shape[1]), requires_grad=False)
            dropped += 1
    return packed, dropped
