"""The int8 KV cache (`--kv-cache-dtype int8`, layers/kv_int8.py + kernels/csrc/kv8.h): the
native cache write gives the torch writer's bytes; the native attention over it equals a
float reference of the same arithmetic (dequantized keys and values, the query rounded to
int8 as the kernel does), for decode, prefill and chunked-prefill rows, windows, GQA, head
dims 64/128 (vector path) and 96 (generic loop); the torch fallback reads the same cache."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from tokenmill.kernels.cpu import cpu_kernels
from tokenmill.layers import kv_int8
from tokenmill.layers.attention import TorchPagedAttention

native = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                            reason="no C++ compiler: no native kernels")


def _dequant(x: torch.Tensor) -> torch.Tensor:
    q, d = kv_int8.quantize(x)
    return (q.float().unflatten(-1, (-1, kv_int8.GROUP)) * d[..., None]).flatten(-2)


def test_quantize_is_q8_0() -> None:
    x = torch.randn(5, 3, 64) * torch.tensor([0.01, 1.0, 30.0])[None, :, None]
    x[0, 0, :32] = 0  # an all-zero group: scale 0, q 0
    q, d = kv_int8.quantize(x)
    assert q.dtype == torch.int8 and d.shape == (5, 3, 2)
    assert q.abs().max() <= 127 and int(q[0, 0, :32].abs().sum()) == 0 and d[0, 0, 0] == 0
    groups = x.unflatten(-1, (2, 32))
    torch.testing.assert_close(d, groups.abs().amax(-1) / 127)
    err = (_dequant(x) - x).unflatten(-1, (2, 32)).abs().amax(-1)
    assert (err <= d / 2 * (1 + 1e-5)).all()  # round to nearest: half a step at most


@pytest.mark.parametrize("bs", [16, 32])
def test_write_then_gather_round_trips(bs: int) -> None:
    hk, d, nb = 2, 64, 6
    cache = torch.zeros(2, hk, nb, kv_int8.block_bytes(bs, d), dtype=torch.int8)
    slots = torch.tensor(random.Random(0).sample(range(nb * bs), 40))
    k, v = torch.randn(40, hk, d), torch.randn(40, hk, d)
    kv_int8.write(cache, k, v, slots)
    kg, vg = kv_int8.gather(cache, torch.arange(nb)[None], d, torch.float32)  # [Hk, 1, slots, D]
    torch.testing.assert_close(kg[:, 0, slots].transpose(0, 1), _dequant(k), rtol=0, atol=0)
    torch.testing.assert_close(vg[:, 0, slots].transpose(0, 1), _dequant(v), rtol=0, atol=0)
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots] = False
    assert int(kg[:, 0, untouched].abs().sum()) == 0


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,bs", [(64, 16), (128, 32), (96, 16)])
def test_native_write_gives_the_torch_writers_bytes(d: int, bs: int, dtype: torch.dtype
                                                    ) -> None:
    """rope_kv into the int8 cache = rope_kv into a plain cache, then the torch writer."""
    kern = cpu_kernels()
    assert kern is not None
    hq, hk, nb, t = 4, 2, 8, 21
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(dtype)
    pos = torch.arange(t) * 3
    cos = torch.cos(torch.arange(64)[:, None] * torch.linspace(0, 1, d)[None]).to(dtype)
    sin = torch.sin(torch.arange(64)[:, None] * torch.linspace(0, 1, d)[None]).to(dtype)
    slots = torch.tensor(random.Random(1).sample(range(nb * bs), t))
    plain = torch.zeros(2, hk, nb, bs, d, dtype=dtype)
    int8 = torch.zeros(2, hk, nb, kv_int8.block_bytes(bs, d), dtype=torch.int8)
    assert kern.supports_rope_kv(qkv, plain, cos, hq) and kern.supports_rope_kv(qkv, int8, cos, hq)
    rotated = qkv.clone()
    kern.rope_kv(rotated, pos, cos, sin, plain, slots, hq)
    kern.rope_kv(qkv, pos, cos, sin, int8, slots, hq)
    assert torch.equal(qkv, rotated)  # q and k rotated alike
    ref = torch.zeros_like(int8)
    kv = rotated[:, hq * d:].view(t, 2, hk, d)
    kv_int8.write(ref, kv[:, 0], kv[:, 1], slots)
    assert torch.equal(int8, ref)


def _reference(q: torch.Tensor, cache: torch.Tensor, rows_tables: torch.Tensor,
               seq: torch.Tensor, bounds: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's arithmetic in float64: keys and values dequantized, the query rounded to
    int8 per group of 32 as the kernel rounds it."""
    t, hq, d = q.shape
    hk = cache.shape[1]
    kg, vg = kv_int8.gather(cache, rows_tables, d, torch.float32)
    qf = _dequant(q.float()).double()
    out = torch.empty(t, hq, d, dtype=torch.float64)
    for r in range(t):
        s, (a, b) = int(seq[r]), bounds[r].tolist()
        k = kg[:, s, a:b].double().repeat_interleave(hq // hk, 0)
        v = vg[:, s, a:b].double().repeat_interleave(hq // hk, 0)
        w = (torch.einsum("hd,hkd->hk", qf[r], k) * scale).softmax(-1)
        out[r] = torch.einsum("hk,hkd->hd", w, v)
    return out


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hk,d,bs,window,long", [
    (6, 2, 64, 16, None, False), (9, 3, 64, 32, 5, False), (4, 4, 128, 16, None, False),
    (8, 2, 128, 16, 20, False), (4, 1, 96, 16, None, False),
    (6, 2, 64, 16, None, True), (4, 1, 96, 32, None, True)])
def test_native_rows_equal_the_reference(hq: int, hk: int, d: int, bs: int,
                                         window: int | None, long: bool, dtype: torch.dtype
                                         ) -> None:
    gen = torch.Generator().manual_seed(0)
    nb = 24 * (10 if long else 1)
    blocks = random.Random(1).sample(range(nb), nb)
    per = nb // 4
    tables = [blocks[i * per:(i + 1) * per] for i in range(4)]
    # two decodes, a fresh prefill, a chunk of 6 over 50 cached keys (blocks scattered); long:
    # a decode over 600 keys and a chunk over 700
    qlens, ctxs = ([1, 1, 7, 6], [600, 40, 7, 706] if long else [9, 40, 7, 56])
    backend = TorchPagedAttention()
    meta = backend.build_metadata(qlens, ctxs, tables, bs, window, torch.device("cpu"))
    rows = meta.rows
    assert rows is not None
    cache = torch.zeros(2, hk, nb, kv_int8.block_bytes(bs, d), dtype=torch.int8)
    ctx_slots = [t[p // bs] * bs + p % bs for t, c, ql in zip(tables, ctxs, qlens)
                 for p in range(c - ql)]  # the keys already cached
    kv_int8.write(cache, torch.randn(len(ctx_slots), hk, d, generator=gen),
                  torch.randn(len(ctx_slots), hk, d, generator=gen), torch.tensor(ctx_slots))
    t = sum(qlens)
    q = (torch.randn(t, hq, d, generator=gen) * 2).to(dtype)
    k = torch.randn(t, hk, d, generator=gen).to(dtype)
    v = torch.randn(t, hk, d, generator=gen).to(dtype)
    kern = cpu_kernels()
    assert kern is not None and kern.supports_decode(q, cache)
    fallback_cache = cache.clone()
    out = backend.forward(q, k, v, cache, meta, d ** -0.5)  # writes k/v, then the kernel
    ref = _reference(q, cache, rows.tables, rows.seq, rows.bounds, d ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # The torch fallback (gather, dequantize, SDPA) reads the same cache; its query is not
    # rounded to int8, hence the looser bound.
    meta.rows = None
    fallback = backend.forward(q, k, v, fallback_cache, meta, d ** -0.5)
    assert torch.equal(fallback_cache, cache)  # the torch writer wrote the same bytes
    torch.testing.assert_close(fallback.double(), ref, atol=0.05, rtol=0.05)


def test_unsupported_configurations_are_named() -> None:
    assert kv_int8.unsupported(64, 16) is None and kv_int8.unsupported(128, 32) is None
    assert "multiple of 32" in (kv_int8.unsupported(80, 16) or "")
    assert "block size" in (kv_int8.unsupported(64, 8) or "")


def test_a_model_the_layout_cannot_hold_is_a_start_up_error(tmp_path) -> None:
    pytest.importorskip("transformers")
    from models.test_model_parity import make_tiny
    from tokenmill.llm import LLM
    from tokenmill.loader import ModelLoadError

    make_tiny("llama", tmp_path)  # head dim 16
    with pytest.raises(ModelLoadError, match="multiple of 32, not 16"):
        LLM(model_id=str(tmp_path), device="cpu", kv_cache_dtype="int8",
            max_batch_total_tokens=256)


def test_int8_blocks_take_18_bytes_per_16_values() -> None:
    from types import SimpleNamespace

    from tokenmill.runner.loading import kv_bytes_per_token

    model = SimpleNamespace(cfg=SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64))
    assert kv_bytes_per_token(model, torch.bfloat16) == 30 * 2 * 3 * 64 * 2  # type: ignore[arg-type]
    assert kv_bytes_per_token(model, torch.int8) == 30 * 2 * 3 * 72  # type: ignore[arg-type]
    assert kv_int8.block_bytes(16, 64) == 16 * 72 and kv_int8.block_size_of(
        torch.empty(2, 3, 5, kv_int8.block_bytes(32, 64), dtype=torch.int8), 64) == 32


@native
@pytest.mark.parametrize("d", [64, 96])
def test_flat_attention_over_many_large_values(d: int) -> None:
    """A zero query weighs 1,000 keys alike and every value is int8's largest: the output is
    the value itself (the sums of 1,000 terms stay exact enough)."""
    hq, hk, bs, n = 2, 1, 16, 1000
    nb = -(-n // bs)
    cache = torch.zeros(2, hk, nb, kv_int8.block_bytes(bs, d), dtype=torch.int8)
    kv_int8.write(cache, torch.randn(n, hk, d), torch.full((n, hk, d), 3.0), torch.arange(n))
    backend = TorchPagedAttention()
    meta = backend.build_metadata([1], [n], [list(range(nb))], bs, None, torch.device("cpu"))
    rows = meta.rows
    kern = cpu_kernels()
    assert rows is not None and kern is not None
    out = kern.paged_decode(torch.zeros(1, hq, d), cache, rows.tables, rows.bounds,
                            rows.max_keys, d ** -0.5, rows.seq)
    torch.testing.assert_close(out, torch.full((1, hq, d), 3.0), rtol=1e-4, atol=1e-4)
