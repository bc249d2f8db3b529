"""RMSNorm with an optional fused residual add (Llama/Qwen/Mistral form: weight * x_hat)."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.cpu import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 and cast back before the weight, exactly as transformers does.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new_residual); with a residual, adds it first (pre-norm blocks)."""
        if (x.device.type == "cpu" and (k := cpu_kernels()) is not None
                and k.supports_norm(x, residual, self.weight)):  # one call, not ~9 ops
            return k.add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return self._norm(x), x

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x)
