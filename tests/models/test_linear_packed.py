"""`prepare_cpu_weights`: dense CPU layers keep their weights packed, in tokenmill's tiles
(kernels/csrc/dense.cpp: each row's bits its own, whatever the batch) or in oneDNN's layout
(the results of `F.linear` on the plain weight; bfloat16: the same bits); layers whose
quantized matmul serves every row count (w4a8) drop the plain weight they never read; a plain
weight another module shares (a tied head's embedding) stays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu import cpu_kernels
from tokenmill.layers.dense import OneDnnWeight, TiledWeight, prepare_cpu_weights
from tokenmill.layers.linear import Linear, MergedLinear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


class Tiny(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32, dtype=dtype)
        self.qkv = MergedLinear(32, [("q", 32), ("k", 16), ("v", 16)], bias=True)
        self.down = Linear(48, 32)
        self.head = Linear(32, 64)
        self.head.weight = self.embed.weight  # tied
        for m in (self.qkv, self.down):
            m.to(dtype)
            with torch.no_grad():
                m.weight.normal_()
                if m.bias is not None:
                    m.bias.normal_()


def _tiled_or_skip(tiled: bool) -> None:
    if tiled and cpu_kernels() is None:
        pytest.skip("no native CPU kernels")


@pytest.mark.parametrize("tiled", [True, False], ids=["tiles", "onednn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_layers_match_the_plain_matmul(dtype: torch.dtype, tiled: bool) -> None:
    _tiled_or_skip(tiled)
    model = Tiny(dtype)
    plain = {n: (m.weight.detach().clone(), m.bias) for n, m in model.named_modules()
             if isinstance(m, Linear)}
    assert prepare_cpu_weights(model, tiled) == (3, 2)  # the tied head keeps the embedding
    assert prepare_cpu_weights(model, tiled) == (0, 0)  # once
    kind = TiledWeight if tiled else OneDnnWeight
    for name, m in model.named_modules():
        if not isinstance(m, Linear):
            continue
        w, b = plain[name]
        assert isinstance(m.packed, kind) and torch.equal(m.dense_weight(), w)
        # the plain copy is dropped, except the tied head's (it is the embedding)
        assert m.weight.shape[0] == (64 if name == "head" else 0)
        for rows in (1, 5, 40):
            x = torch.randn(rows, w.shape[1]).to(dtype)
            got, want = m(x), F.linear(x, w, b)
            if dtype == torch.bfloat16 and not tiled:  # F.linear's kernel: the same bits
                assert torch.equal(got, want)
            elif dtype == torch.bfloat16:  # float32 sums, rounded once (bias: twice)
                torch.testing.assert_close(got, want, rtol=1.6e-2, atol=2e-2)
            else:  # another order of the same float32 sums
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if tiled:  # each row alone: the same bits as in the batch
                assert all(torch.equal(m(x[i:i + 1]), got[i:i + 1]) for i in range(rows))
    assert model.embed.weight.shape == (64, 32)
    # a strided input (a slice of a wider activation) and a batch of sequences
    x = torch.randn(3, 4, 80).to(dtype)[..., 16:64]
    torch.testing.assert_close(model.down(x), F.linear(x, plain["down"][0]))
    assert model.down(x[:, :0]).shape == (3, 0, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tiles_against_float64(dtype: torch.dtype) -> None:
    """Every row count the kernel's row and tile blocks split differently (1-6 rows a block,
    1-4 tiles, 64-row chunks), N not a multiple of the tile block: float32 sums of the exact
    products, each row the same alone."""
    _tiled_or_skip(True)
    kernels = cpu_kernels()
    assert kernels is not None
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(80, 130, generator=gen).to(dtype)
    packed = TiledWeight(w, kernels)
    assert torch.equal(packed.to_dense(), w)
    x = torch.randn(140, 130, generator=gen).to(dtype)
    full = packed.matmul(x, None)
    want = x.double() @ w.double().T
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(full.double(), want, rtol=tol, atol=tol * 4)
    for lo, hi in ((0, 1), (3, 10), (60, 131), (139, 140)):
        assert torch.equal(packed.matmul(x[lo:hi], None), full[lo:hi])
    with pytest.raises(ValueError, match="for a"):
        packed.matmul(x.float() if dtype == torch.bfloat16 else x.bfloat16(), None)
    assert not TiledWeight.fits(torch.zeros(24, 8, dtype=dtype))  # N not a multiple of 16
    assert not TiledWeight.fits(torch.zeros(16, 7, dtype=torch.bfloat16))  # odd K
    assert not TiledWeight.fits(torch.zeros(16, 8, dtype=torch.float16))
    odd = Linear(8, 24).to(dtype)  # not tiles: oneDNN's layout instead
    assert prepare_cpu_weights(odd) == (1, 1) and isinstance(odd.packed, OneDnnWeight)


def test_w4a8_layers_drop_the_plain_weight_and_float16_stays() -> None:
    from tokenmill.kernels.cpu import cpu_kernels
    from tokenmill.layers.quant import W4A8Weight

    if cpu_kernels() is None:
        pytest.skip("no native CPU kernels")

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fp16 = Linear(32, 16).to(torch.float16)
            self.w4a8 = Linear(64, 32).to(torch.bfloat16)

    model = Both()
    with torch.no_grad():
        model.w4a8.weight.normal_()
    quant, reference = W4A8Weight.quantize(model.w4a8.weight, torch.bfloat16)
    model.w4a8.quant = quant
    with torch.no_grad():
        model.w4a8.weight.copy_(reference)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    before = model.w4a8(x)
    assert prepare_cpu_weights(model) == (0, 1)
    assert model.fp16.packed is None and model.fp16.weight.shape == (16, 32)
    assert model.w4a8.packed is None and model.w4a8.weight.shape == (0, 64)
    assert torch.equal(model.w4a8.dense_weight(), reference.to(torch.bfloat16))
    # rows of any leading shape take the quantized matmul, which needs no plain weight
    assert torch.equal(model.w4a8(x), before)
    assert torch.equal(model.w4a8(x), quant.matmul(x.view(6, 64)).view(2, 3, 32))
    assert model.w4a8(x[:, :0]).shape == (2, 0, 32) and model.w4a8(x[0, :0]).shape == (0, 32)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_mkldnn_disabled_packs_nothing() -> None:
    model = Tiny(torch.bfloat16)
    with torch.backends.mkldnn.flags(enabled=False):
        assert prepare_cpu_weights(model, tiled=False) == (0, 0)
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))


def test_a_dtype_onednn_refuses_stays_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some CPUs and builds refuse bfloat16 reorders (no AVX-512): those layers keep F.linear."""
    real = torch.ops.mkldnn._reorder_linear_weight

    def reorder(w: torch.Tensor, batch: int | None) -> torch.Tensor:
        if w.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs avx512bw")
        return real(w, batch)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    model = Tiny(torch.bfloat16)
    assert prepare_cpu_weights(model, tiled=False) == (0, 0)
    x = torch.randn(2, 48).to(torch.bfloat16)
    assert model.down.packed is None and torch.equal(model.down(x), F.linear(x, model.down.weight))
    assert prepare_cpu_weights(Tiny(torch.float32), tiled=False) == (3, 2)
