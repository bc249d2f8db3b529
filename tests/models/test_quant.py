"""Weight-only quantization (--quantize int4 / w4a8): the packed kernels against their
dequantized reference, exactness for GGUF Q4_1 blocks, and whole models with every fast path
on. The w4a8 kernel itself is tested in tests/kernels/test_w4a8.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.layers import linear as linear_mod
from tokenmill.layers.attention import TorchPagedAttention
from tokenmill.layers.quant import (
    Int4Weight,
    ResidualWeight,
    W4A8Weight,
    W8A8Weight,
    quantize_model,
)
from tokenmill.loader import ModelLoadError
from tokenmill.runner.loading import load_model


def q4_1_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weights as GGUF's Q4_1 stores them: q·d + m per block of 32, q in 0..15 (both ends used,
    as llama.cpp's quantizer does)."""
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(n, k // 32, 1, generator=gen) * 0.02 + 1e-3
    m = torch.randn(n, k // 32, 1, generator=gen) * 0.05
    return (q * d + m).view(n, k)


def test_q4_1_blocks_requantize_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    w = q4_1_weight(64, 96, gen)
    qw, reference = Int4Weight.quantize(w, torch.float32)
    torch.testing.assert_close(reference, w, atol=1e-6, rtol=0)
    x = torch.randn(3, 96, generator=gen)
    torch.testing.assert_close(qw.matmul(x), x @ w.t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [Int4Weight, ResidualWeight])
def test_kernel_equals_its_dequantized_reference(kind: type, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=gen)
    w[3, :32] = 0.25  # a constant int4 group, and a zero row
    w[5] = 0.0
    qw, ref = kind.quantize(w, dtype)
    # The quantization error itself is bounded (4 bits: under 1/30 of a group's range).
    err = (ref - w).abs().max().item()
    assert 0 < err < (0.3 if kind is Int4Weight else 0.03)  # 4 bits / about 8 bits
    assert torch.equal(ref[5], torch.zeros(128))
    if kind is Int4Weight and dtype == torch.float32:
        torch.testing.assert_close(ref[3, :32], w[3, :32])
    for rows in (1, 3, Int4Weight.max_rows):
        x = torch.randn(rows, 128, generator=gen).to(dtype)
        atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (0.15, 2e-2)  # bf16 outputs
        torch.testing.assert_close(qw.matmul(x).float(), x.float() @ ref.t(), atol=atol, rtol=rtol)


def test_shapes_the_kernel_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="in_features % 32"):
        Int4Weight.quantize(torch.randn(32, 40), torch.float32)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(torch.nn.Linear(2, 2), "fp3", torch.float32)
    with pytest.raises(ValueError, match="unknown quantization"):
        ModelConfig(quantize="nf4")


@pytest.mark.parametrize("method", ["int4", "w4a8"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied head / tied head with biases
def test_tiny_model_quantized_paths_equal_dequantized_reference(
        arch: str, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    from models.test_model_parity import make_tiny

    make_tiny(arch, tmp_path)
    plain = load_model(ModelConfig(model_id=str(tmp_path), dtype="float32")).model
    lm = load_model(ModelConfig(model_id=str(tmp_path), dtype="float32", quantize=method))
    model = lm.model
    kind = Int4Weight if method == "int4" else W4A8Weight
    linears = [m for m in model.modules() if isinstance(m, linear_mod.Linear)]
    assert linears and all(isinstance(m.quant, kind) for m in linears if m is not model.lm_head)
    if method == "int4":
        assert isinstance(model.lm_head.quant, ResidualWeight)
        assert isinstance(model.lm_head.quant.main, Int4Weight)
    else:  # one int8 pass
        assert isinstance(model.lm_head.quant, W8A8Weight)
    # The weights really changed (to their dequantized int4 values), not by much.
    w0 = plain.layers[0].mlp.down_proj.dense_weight()
    w1 = model.layers[0].mlp.down_proj.dense_weight()
    assert 0 < (w0 - w1).abs().max() < 0.05

    block_size, num_blocks = 4, 16
    backend = TorchPagedAttention()
    tokens = torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(2)).tolist()

    def logits(m: torch.nn.Module) -> torch.Tensor:
        m.bind_kv_cache(torch.zeros(m.kv_cache_shape(num_blocks, block_size)))
        out, table = [], list(range(num_blocks))
        # a 10-token prefill (full-precision weights), then 4 one-token decodes (packed kernels)
        for start, chunk in ((0, tokens[:10]), *((i, [tokens[i]]) for i in range(10, 14))):
            meta = backend.build_metadata([len(chunk)], [start + len(chunk)], [table],
                                          block_size, None, torch.device("cpu"))
            with torch.inference_mode():
                h = m(torch.tensor(chunk), torch.arange(start, start + len(chunk)), meta)
                out.append(m.compute_logits(h[-1:]))
        return torch.cat(out)

    fast = logits(model)
    for m in linears:  # the plain weights w4a8 layers drop (prepare_cpu_weights), for the dense path
        if m.weight.shape[0] == 0 and m.packed is None:
            m.weight = torch.nn.Parameter(m.dense_weight(), requires_grad=False)
    for cls in (kind, W8A8Weight):  # every matmul on the dequantized weight
        monkeypatch.setattr(cls, "max_rows", -1)
    reference = logits(model)
    if method == "int4":
        torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    else:  # the activations are rounded to int8 per group of 32: close, not equal
        assert 0 < (fast - reference).abs().max() < 0.02 * reference.abs().max()
        assert torch.equal(fast.argmax(-1), reference.argmax(-1))
    # ... and the quantized model stays close to the original one.
    assert (fast - logits(plain)).abs().max() < 0.5


def test_quantize_refuses_cuda_for_now(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to reach the check")
    from models.test_model_parity import make_tiny

    make_tiny("llama", tmp_path)
    with pytest.raises(ModelLoadError, match="CPU only"):
        load_model(ModelConfig(model_id=str(tmp_path), quantize="int4", device="cuda"))
