"""The paged attention backend on CPU: the native kernel's per-row path (every row its own
query, prefill rows included) against the torch path (gather + SDPA / batched matmuls), for a
mixed step of decodes, a fresh prefill and a chunked prefill over cached context."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from tokenmill.layers.attention import TorchPagedAttention

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler: no native kernels")

HQ, HK, D, BS, NB = 6, 2, 64, 4, 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_native_rows_equal_the_torch_path(window: int | None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    blocks = random.Random(1).sample(range(NB), NB)
    tables = [blocks[0:8], blocks[8:16], blocks[16:28], blocks[28:40]]
    # two decodes (contexts 9 and 14), a fresh 7-token prefill, 6 new tokens after 13 cached
    qlens, ctxs = [1, 1, 7, 6], [9, 14, 7, 19]
    backend = TorchPagedAttention()
    meta = backend.build_metadata(qlens, ctxs, tables, BS, window, torch.device("cpu"))
    rows = meta.rows
    assert rows is not None and rows.seq.tolist() == [0, 1] + [2] * 7 + [3] * 6
    assert rows.bounds[:, 1].tolist() == [9, 14, *range(1, 8), *range(14, 20)]
    assert rows.max_keys == (max(ctxs) if window is None else window)
    cache = torch.randn(2, HK, NB, BS, D, generator=gen).to(dtype)
    t = sum(qlens)
    q = torch.randn(t, HQ, D, generator=gen).to(dtype)
    k = torch.randn(t, HK, D, generator=gen).to(dtype)
    v = torch.randn(t, HK, D, generator=gen).to(dtype)
    native_cache = cache.clone()
    native = backend.forward(q, k, v, native_cache, meta, D ** -0.5)
    meta.rows = None  # the torch path
    torch_out = backend.forward(q, k, v, cache, meta, D ** -0.5)
    assert torch.equal(native_cache, cache)  # the same keys and values written
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(native.float(), torch_out.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [None, 1, 5, 64])
def test_row_keys_of_random_steps(window: int | None) -> None:
    """Each row's key range [start, end) and sequence, checked row by row against the
    positions they stand for, over random mixes of decodes and (chunked) prefills."""
    rng = random.Random(window)
    backend = TorchPagedAttention()
    for _ in range(50):
        n = rng.randint(1, 6)
        qlens = [rng.choice([1, 1, rng.randint(1, 40)]) for _ in range(n)]
        ctxs = [q + rng.choice([0, rng.randint(0, 50)]) for q in qlens]
        tables = [list(range(-(-c // BS))) for c in ctxs]
        rows = backend.build_metadata(qlens, ctxs, tables, BS, window, torch.device("cpu")).rows
        assert rows is not None
        want_seq, want_bounds = [], []
        for i, (q, c) in enumerate(zip(qlens, ctxs)):
            for pos in range(c - q, c):  # the row of the token at `pos` sees keys <= pos
                want_seq.append(i)
                want_bounds.append([0 if window is None else max(0, pos + 1 - window), pos + 1])
        assert rows.seq.dtype == rows.bounds.dtype == torch.long and rows.bounds.is_contiguous()
        assert rows.seq.tolist() == want_seq and rows.bounds.tolist() == want_bounds
        assert rows.max_keys == max(e - s for s, e in want_bounds)
        assert rows.tables.shape == (n, max(len(t) for t in tables))


def test_torch_path_runs_a_fresh_prompt_causal_without_a_mask(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gather + SDPA path gives a fresh prompt (no cached keys, no window cut) SDPA's
    causal flag over exactly its keys and no mask, so CUDA's flash kernels apply; a prompt
    over cached keys keeps its mask. (The outputs: test_native_rows_equal_the_torch_path.)"""
    from tokenmill.layers import attention

    calls: list[tuple[bool, bool, int]] = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append((bool(kw.get("is_causal")), kw.get("attn_mask") is None, k.shape[-2]))
        return sdpa(q, k, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    gen = torch.Generator().manual_seed(0)
    qlens, ctxs = [1, 7, 6], [9, 7, 19]  # a decode, a fresh 7-token prompt, 6 after 13 cached
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 28))]
    backend = TorchPagedAttention()
    meta = backend.build_metadata(qlens, ctxs, tables, BS, None, torch.device("cpu"))
    meta.rows = None  # the torch path
    t = sum(qlens)
    backend.forward(torch.randn(t, HQ, D, generator=gen), torch.randn(t, HK, D, generator=gen),
                    torch.randn(t, HK, D, generator=gen), torch.randn(2, HK, NB, BS, D,
                                                                   generator=gen),
                    meta, D ** -0.5)
    assert calls == [(True, True, 7), (False, False, 20)]  # 19 keys: 5 blocks of 4 gathered


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_float8_cache_saturates_and_round_trips(fp8: torch.dtype) -> None:
    """`--kv-cache-dtype fp8_*`: keys and values are cast as they are written, clamped to the
    type's largest finite value (a plain cast turns 1e6 into NaN in e4m3fn, or inf in e5m2),
    and read back as the cast values; decode attention over them equals attention over the
    widened cache."""
    backend, hk, d, bs = TorchPagedAttention(), 2, 8, 4
    cache = torch.zeros(2, hk, 3, bs, d, dtype=fp8)
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(6, hk, d, generator=gen) for _ in range(2))
    k[0, 0, :2] = torch.tensor([1e6, -1e6])
    meta = backend.build_metadata([6], [6], [[2, 0]], bs, None, torch.device("cpu"))
    meta.rows = None  # the torch path
    backend.write_kv(k, v, cache, meta)
    top = torch.finfo(fp8).max
    stored = cache.float()[0, 0].reshape(-1, d)[8]  # slot 8: block 2, row 0 = token 0
    assert stored[:2].tolist() == [top, -top] and torch.isfinite(cache.float()).all()
    want = k.clamp(-top, top).to(fp8).float()
    slots = [8, 9, 10, 11, 0, 1]  # blocks [2, 0]
    assert torch.equal(cache.float()[0].reshape(hk, -1, d)[:, slots].transpose(0, 1), want)
    q = torch.randn(1, 4, d, generator=gen)
    dmeta = backend.build_metadata([1], [6], [[2, 0]], bs, None, torch.device("cpu"))
    dmeta.rows = None
    got = backend.forward(q, k[:0], v[:0], cache, dmeta, d ** -0.5, kv_written=True)
    wide = cache.float()
    assert torch.equal(got, backend.forward(q, k[:0], v[:0], wide, dmeta, d ** -0.5,
                                            kv_written=True))
