"""The native CPU kernels (kernels/cpu.py): build and cache, fallbacks, and the LoRA SGMV kernel
against a float64 reference, in float32 and bfloat16, with fused (block-diagonal) B."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tokenmill.kernels import cpu
from tokenmill.kernels.cpu import build, cpu_kernels, lora_chunks

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="no C++ compiler on this machine")


@needs_compiler
def test_builds_once_and_caches(tmp_path: Path) -> None:
    lib = build(tmp_path)
    assert lib.exists() and lib.parent.parent == tmp_path
    mtime = lib.stat().st_mtime_ns
    assert build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left behind
    assert cpu_kernels() is not None  # a machine with a compiler serves the native path


def test_compiler_failure_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(RuntimeError, match="failed"):
        build(tmp_path)
    monkeypatch.setenv("TOKENMILL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "_loaded", [])
    assert cpu_kernels() is None
    assert "CPU kernels unavailable" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_switched_off_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMILL_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu, "_loaded", [])
    assert cpu_kernels() is None


def test_chunks_cover_each_column_once_with_its_shard_ranks() -> None:
    shards, rank = [100, 64, 30], 12  # rank block 4 per shard
    table = lora_chunks(shards, rank, width=32).tolist()
    cols: list[int] = []
    for first, width, r_lo, r_hi in table:
        assert 0 < width <= 32
        shard = 0 if first < 100 else 1 if first < 164 else 2
        assert (r_lo, r_hi) == (4 * shard, 4 * shard + 4)
        assert first + width <= [100, 164, 194][shard]  # a block never spans two shards
        cols += range(first, first + width)
    assert cols == list(range(194))


def _case(dtype: torch.dtype, shards: list[int], rb: int, n_slots: int, seed: int = 0):
    """Random stacks as LoraLinear holds them: A [S, n*rb, in] stored as [S, in, n*rb], and a
    block-diagonal B [S, out, n*rb] stored as [S, n*rb, out]."""
    g = torch.Generator().manual_seed(seed)
    fan_in, out, r = 72, sum(shards), rb * len(shards)
    a = (0.1 * torch.randn(n_slots, fan_in, r, generator=g)).to(dtype).transpose(1, 2)
    b = torch.zeros(n_slots, r, out)
    start = 0
    for j, rows in enumerate(shards):
        b[:, j * rb:(j + 1) * rb, start:start + rows] = 0.1 * torch.randn(n_slots, rb, rows,
                                                                         generator=g)
        start += rows
    return a, b.to(dtype).transpose(1, 2), fan_in, out


def _reference(y: torch.Tensor, x: torch.Tensor, slots: list[int], a: torch.Tensor,
               b: torch.Tensor) -> torch.Tensor:
    want = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            want[t] += b[s].double() @ (a[s].double() @ x[t].double())
    return want


def _run(y: torch.Tensor, x: torch.Tensor, slots: list[int], a: torch.Tensor, b: torch.Tensor,
         shards: list[int]) -> torch.Tensor:
    from tokenmill.lora.punica import lora_add_, make_plan

    plan = make_plan(slots, torch.device("cpu"), cpu=True)
    assert plan is not None and plan.cpu_meta is not None
    y = y.clone()
    lora_add_(y, x, plan, a, b, lora_chunks(shards, a.shape[1]))
    return y


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [[80], [48, 16, 16], [40, 40]])
def test_lora_kernel_matches_reference(dtype: torch.dtype, shards: list[int]) -> None:
    kernel = cpu_kernels()
    assert kernel is not None
    a, b, fan_in, out = _case(dtype, shards, rb=5, n_slots=4)  # odd rank: a half-used pair
    assert kernel.supports_lora(torch.zeros(1, fan_in, dtype=dtype),
                                torch.zeros(1, out, dtype=dtype), a, b)
    g = torch.Generator().manual_seed(1)
    slots = [2, -1, 0, 2, 3, 3, 3, 3, 3, -1, 1, 2, 0]  # unsorted, 5 rows on one slot, no-adapter
    x = torch.randn(len(slots), fan_in, generator=g).to(dtype)
    y = torch.randn(len(slots), out, generator=g).to(dtype)
    got = _run(y, x, slots, a, b, shards)
    want = _reference(y, x, slots, a, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    for t in (1, 9):  # rows without an adapter are not touched
        assert torch.equal(got[t], y[t])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_kernel_row_results_do_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    """A row gets the same bits alone and in any batch: no output depends on its neighbours."""
    shards = [48, 16, 16]
    a, b, fan_in, out = _case(dtype, shards, rb=4, n_slots=3, seed=2)
    g = torch.Generator().manual_seed(5)
    # segments of 2, 9 and 1 rows: blocks of 2; 4, 4 and 1; 1 row
    slots = [0, 1, 1, 2, 1, 0, 1, 1, 1, 1, 1, 1]
    n = len(slots)
    x = torch.randn(n, fan_in, generator=g).to(dtype)
    y = torch.randn(n, out, generator=g).to(dtype)
    batch = _run(y, x, slots, a, b, shards)
    for t in range(n):
        alone = _run(y[t:t + 1], x[t:t + 1], [slots[t]], a, b, shards)
        assert torch.equal(alone[0], batch[t]), t
    for k in (2, 3):  # the first k rows of slot 1 as a block of k
        sub = [t for t in range(n) if slots[t] == 1][:k]
        part = _run(y[sub], x[sub], [1] * k, a, b, shards)
        assert torch.equal(part, batch[sub]), k
    reordered = list(reversed(range(n)))
    batch2 = _run(y[reordered], x[reordered], [slots[t] for t in reordered], a, b, shards)
    assert torch.equal(batch2, batch[reordered])


@needs_compiler
def test_lora_add_falls_back_on_a_layout_the_kernel_does_not_take() -> None:
    from tokenmill.lora.punica import lora_add_, make_plan

    kernel = cpu_kernels()
    assert kernel is not None
    a, b, fan_in, out = _case(torch.float32, [80], rb=4, n_slots=2)
    b_plain = b.contiguous()  # [S, out, R] row-major: not the kernel's layout
    x, y = torch.randn(3, fan_in), torch.zeros(3, out)
    assert not kernel.supports_lora(x, y, a, b_plain)
    assert not kernel.supports_lora(x, y, a.contiguous(), b)
    plan = make_plan([0, 1, 1], torch.device("cpu"), cpu=True)
    assert plan is not None
    got = lora_add_(y.clone(), x, plan, a, b_plain)
    torch.testing.assert_close(got.double(), _reference(y, x, [0, 1, 1], a, b), atol=1e-5,
                               rtol=1e-5)


def test_long_segments_take_the_torch_path() -> None:
    from tokenmill.lora.punica import CPU_KERNEL_MAX_ROWS_PER_SLOT, make_plan

    n = CPU_KERNEL_MAX_ROWS_PER_SLOT
    short = make_plan([0] * n + [1] * n, torch.device("cpu"), cpu=True)
    long = make_plan([0] * (n + 1), torch.device("cpu"), cpu=True)
    assert short is not None and short.cpu_meta is not None
    assert long is not None and long.cpu_meta is None  # a long prefill: oneDNN's bmm is faster


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hk", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("d,bs", [(16, 4), (64, 16), (128, 16)])  # 64/128 x 16: 16-key tiles
def test_paged_decode_matches_sdpa(dtype: torch.dtype, hq: int, hk: int, d: int,
                                   bs: int) -> None:
    """Decode attention straight from a shuffled paged cache equals SDPA over each sequence's
    gathered keys, with full contexts and sliding-window ranges."""
    import torch.nn.functional as F

    kernel = cpu_kernels()
    assert kernel is not None
    g = torch.Generator().manual_seed(7)
    n_blocks = 40
    cache = torch.randn(2, hk, n_blocks, bs, d, generator=g).to(dtype)
    bounds = [(0, 1), (0, 13), (5, 37), (0, 16)]  # (start, end): one key, partial blocks, window
    order = torch.randperm(n_blocks, generator=g).tolist()
    tables = torch.zeros(len(bounds), 10, dtype=torch.long)
    for i, (_, end) in enumerate(bounds):
        n = -(-end // bs)
        tables[i, :n] = torch.tensor(order[:n])
        order = order[n:]
    qkv = torch.randn(len(bounds), hq + 2 * hk, d, generator=g).to(dtype)
    q = qkv[:, :hq]  # a view with the token stride of a fused qkv, as the model passes it
    assert kernel.supports_decode(q, cache)
    got = kernel.paged_decode(q, cache, tables, torch.tensor(bounds), 37, 0.3)
    for i, (start, end) in enumerate(bounds):
        pos = torch.arange(start, end)
        slots = tables[i, pos // bs] * bs + pos % bs
        k = cache[0].reshape(hk, -1, d)[:, slots].float()
        v = cache[1].reshape(hk, -1, d)[:, slots].float()
        want = F.scaled_dot_product_attention(q[i].float().view(1, hq, 1, d), k[None], v[None],
                                              scale=0.3, enable_gqa=hq != hk).view(hq, d)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[i].float(), want, atol=tol, rtol=tol)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bs", [16, 8])  # bfloat16: the 16-key tiles, and the generic loops
def test_paged_decode_rows_do_not_depend_on_the_batch(dtype: torch.dtype, threads: int, bs: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row's output is bit for bit the same alone as among other rows (batch invariance:
    a greedy token must not change with the company it keeps). float32 broke this once: the
    compiler's versions of the inlined score sum switched with the next work item's length."""
    kernel = cpu_kernels()
    assert kernel is not None
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(3)
    hq, hk, d = 9, 3, 64
    ctxs = [113, 40, 77, 5, 120, 64, 17]
    per = [-(-c // bs) for c in ctxs]
    cache = torch.randn(2, hk, sum(per), bs, d, generator=g).to(dtype)
    tables = torch.zeros(len(ctxs), max(per), dtype=torch.long)
    first = 0
    for i, n in enumerate(per):
        tables[i, :n] = torch.arange(first, first + n)
        first += n
    bounds = torch.tensor([[0, c] for c in ctxs])
    q = torch.randn(len(ctxs), hq, d, generator=g).to(dtype)
    batch = kernel.paged_decode(q, cache, tables, bounds, max(ctxs), d ** -0.5)
    for i, c in enumerate(ctxs):
        alone = kernel.paged_decode(q[i:i + 1].contiguous(), cache, tables[i:i + 1].contiguous(),
                                    bounds[i:i + 1].contiguous(), c, d ** -0.5)
        assert torch.equal(alone[0], batch[i]), i


@needs_compiler
@pytest.mark.parametrize("cache_kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("hq,hk,d", [(9, 3, 64), (8, 2, 128), (4, 1, 64)])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_rows_taken_in_blocks_get_their_bits_alone(cache_kind: str, hq: int, hk: int,
                                                           d: int, threads: int,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A prefill's consecutive rows of one sequence share a work item (their weighted sums
    widen each V row once); each row still gets, bit for bit, what it gets alone: blocks cut
    at 8 rows and at a sequence's end, a block's rows ending in different 16-key chunks, rows
    starting at 0 or after cached keys, a decode row and a sliding-window chunk (not blocked)
    in between."""
    from tokenmill.layers import kv_int8

    kernel = cpu_kernels()
    assert kernel is not None
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(11)
    bs = 16
    # (sequence, start, first end, rows): 13 rows after 20 cached keys, a decode row, 9 rows of
    # a fresh prompt, 5 windowed rows (starts move with the ends), 17 rows over 3 blocks
    spans = [(0, 0, 21, 13), (1, 0, 50, 1), (2, 0, 1, 9), (3, 0, 30, 5), (4, 0, 40, 17)]
    window = 12
    per_seq = 4
    tables = torch.arange(len(spans) * per_seq).view(len(spans), per_seq)
    tables = tables[:, torch.randperm(per_seq, generator=g)].contiguous()
    row_seq, bounds = [], []
    for seq, start, end0, n in spans:
        for i in range(n):
            end = end0 + i
            row_seq.append(seq)
            bounds.append((max(0, end - window) if seq == 3 else start, end))
    n_slots = len(spans) * per_seq * bs
    keys = torch.randn(n_slots, hk, d, generator=g)
    values = torch.randn(n_slots, hk, d, generator=g)
    if cache_kind == "int8":
        cache = torch.zeros(2, hk, len(spans) * per_seq, kv_int8.block_bytes(bs, d),
                            dtype=torch.int8)
        kv_int8.write(cache, keys, values, torch.arange(n_slots))
    else:
        cache = torch.stack([keys, values]).transpose(1, 2).reshape(
            2, hk, len(spans) * per_seq, bs, d).to(torch.bfloat16).contiguous()
    q = torch.randn(len(row_seq), hq, d, generator=g).to(torch.bfloat16)
    bt, seq_t = torch.tensor(bounds), torch.tensor(row_seq)
    max_keys = max(e - s for s, e in bounds)
    batch = kernel.paged_decode(q, cache, tables, bt, max_keys, d ** -0.5, seq_t)
    for i, s in enumerate(row_seq):
        alone = kernel.paged_decode(q[i:i + 1].contiguous(), cache, tables[s:s + 1].contiguous(),
                                    bt[i:i + 1].contiguous(), max_keys, d ** -0.5)
        assert torch.equal(alone[0].view(torch.int16), batch[i].view(torch.int16)), i


@needs_compiler
@pytest.mark.parametrize("cache_kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_long_rows_take_key_chunks_and_keep_their_bits_alone(
        cache_kind: str, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows with more than 512 keys (attention.cpp SPLIT) run as 512-key chunks whose partial
    softmaxes merge: the result is attention over all their keys (against SDPA on the cache's
    values), and each row's bits are its own alone or among rows of every kind (a 3-chunk
    decode, 512 keys exactly (one item), 513 (a 1-key chunk), a sliding window starting
    mid-block, a prefill crossing 512 keys whose short rows share blocks, a short decode)."""
    import torch.nn.functional as F

    from tokenmill.layers import kv_int8

    kernel = cpu_kernels()
    assert kernel is not None
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(21)
    hq, hk, d, bs = 6, 2, 64, 16
    per_seq = 100  # 1,600 slots a sequence
    rows = [(0, 0, 1500), (1, 0, 512), (2, 0, 513), (3, 301, 1400), (4, 0, 40)]
    rows += [(5, 0, end) for end in range(505, 520)]  # one prefill chunk across the split
    n_seq = 6
    tables = torch.randperm(n_seq * per_seq, generator=g).view(n_seq, per_seq).contiguous()
    n_slots = n_seq * per_seq * bs
    keys = torch.randn(n_slots, hk, d, generator=g)
    values = torch.randn(n_slots, hk, d, generator=g)
    if cache_kind == "int8":
        cache = torch.zeros(2, hk, n_seq * per_seq, kv_int8.block_bytes(bs, d), dtype=torch.int8)
        kv_int8.write(cache, keys, values, torch.arange(n_slots))
        k_all, v_all = kv_int8.gather(cache, tables, d, torch.float32)  # [Hk, S, n, D]
        dtype = torch.bfloat16
    else:
        dtype = getattr(torch, cache_kind)
        cache = torch.stack([keys, values]).transpose(1, 2).reshape(
            2, hk, n_seq * per_seq, bs, d).to(dtype).contiguous()
        k_all = cache[0][:, tables].reshape(hk, n_seq, -1, d).float()
        v_all = cache[1][:, tables].reshape(hk, n_seq, -1, d).float()
    q = torch.randn(len(rows), hq, d, generator=g).to(dtype)
    bounds = torch.tensor([[lo, hi] for _, lo, hi in rows])
    seq = torch.tensor([s for s, _, _ in rows])
    max_keys = max(hi - lo for _, lo, hi in rows)
    batch = kernel.paged_decode(q, cache, tables, bounds, max_keys, d ** -0.5, seq)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (s, lo, hi) in enumerate(rows):
        want = F.scaled_dot_product_attention(
            q[i].float().view(1, hq, 1, d), k_all[None, :, s, lo:hi], v_all[None, :, s, lo:hi],
            scale=d ** -0.5, enable_gqa=True).view(hq, d)
        torch.testing.assert_close(batch[i].float(), want, atol=tol, rtol=tol)
        alone = kernel.paged_decode(q[i:i + 1].contiguous(), cache, tables[s:s + 1].contiguous(),
                                    bounds[i:i + 1].contiguous(), hi - lo, d ** -0.5)
        assert torch.equal(alone[0].view(-1), batch[i].view(-1)), i


@needs_compiler
def test_decode_kernel_declines_what_it_cannot_take() -> None:
    kernel = cpu_kernels()
    assert kernel is not None
    cache = torch.zeros(2, 2, 4, 4, 8)
    assert not kernel.supports_decode(torch.zeros(1, 4, 8, dtype=torch.bfloat16), cache)  # dtype
    assert not kernel.supports_decode(torch.zeros(1, 3, 8), cache)  # 3 heads over 2 KV heads
    assert not kernel.supports_decode(torch.zeros(1, 8, 4).transpose(1, 2), cache)  # strides
    assert not kernel.supports_decode(torch.zeros(1, 4, 8), cache.transpose(3, 4))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_matches_the_torch_module(dtype: torch.dtype, with_residual: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.layers import norm

    kernel = cpu_kernels()
    assert kernel is not None
    g = torch.Generator().manual_seed(11)
    mod = norm.RMSNorm(576, 1e-5)
    mod.weight.data = (1 + 0.1 * torch.randn(576, generator=g)).to(dtype)
    wide = (3 * torch.randn(7, 600, generator=g)).to(dtype)
    x = wide[:, :576]  # rows with a stride, as slices of a fused output are
    residual = torch.randn(7, 576, generator=g).to(dtype) if with_residual else None
    assert kernel.supports_norm(x, residual, mod.weight)
    got, got_r = mod(x, residual)
    monkeypatch.setattr(norm, "cpu_kernels", lambda: None)  # the torch path
    want, want_r = mod(x, residual)
    assert torch.equal(got_r, want_r)
    # the mean of squares is summed in another order: at most one rounding step apart
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got, want, atol=tol * 4, rtol=tol)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_matches_rotary_and_cache_write_bit_for_bit(dtype: torch.dtype) -> None:
    from tokenmill.layers.rotary import RotaryEmbedding

    kernel = cpu_kernels()
    assert kernel is not None
    hq, hk, d, bs, n_blocks = 6, 2, 16, 4, 8
    rot = RotaryEmbedding(d, 64, 10000.0)
    cos, sin = rot.tables(dtype)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, (hq + 2 * hk) * d, generator=g).to(dtype)
    positions = torch.tensor([0, 7, 8, 33, 63])
    slots = torch.tensor([3, 17, 4, 30, 9])
    cache = torch.zeros(2, hk, n_blocks, bs, d, dtype=dtype)
    assert kernel.supports_rope_kv(qkv, cache, cos, hq)
    want = rot.rotate(positions, qkv[:, :(hq + hk) * d].view(5, hq + hk, d))
    v = qkv[:, (hq + hk) * d:].view(5, hk, d).clone()
    got = qkv.clone()
    kernel.rope_kv(got, positions, cos, sin, cache, slots, hq)
    assert torch.equal(got[:, :(hq + hk) * d].view(5, hq + hk, d), want)
    assert torch.equal(got[:, (hq + hk) * d:].view(5, hk, d), v)  # v is not touched
    flat = cache.view(2, hk, n_blocks * bs, d)
    for t in range(5):
        assert torch.equal(flat[0, :, slots[t]], want[t, hq:])
        assert torch.equal(flat[1, :, slots[t]], v[t])
    assert int((flat.abs().sum(-1) != 0).sum()) == 2 * hk * 5  # nothing else written


@needs_compiler
@pytest.mark.parametrize("gap", [0.0, 0.5, 3.3, 20.0, 80.0, 86.5, 88.0, 1e4])
def test_decode_softmax_exp_is_accurate_and_underflows_to_zero(gap: float) -> None:
    """The kernel's own vectorized exp: two keys whose scores differ by `gap`."""
    import math

    kernel = cpu_kernels()
    assert kernel is not None
    d = 16
    cache = torch.zeros(2, 1, 1, 4, d)
    cache[0, 0, 0, 1, 0] = -gap  # key 1 scores -gap, key 0 scores 0 (q = e0)
    cache[1, 0, 0, 1, 0] = 1.0  # so the output is key 1's softmax weight
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    out = kernel.paged_decode(q, cache, torch.zeros(1, 1, dtype=torch.long),
                              torch.tensor([[0, 2]]), 2, 1.0)
    want = math.exp(-gap) / (1 + math.exp(-gap))
    got = float(out[0, 0, 0])
    if want > 1e-37:
        assert abs(got - want) <= 1e-6 * want
    else:
        assert 0.0 <= got <= 1e-37
    assert float(out[0, 0, 1:].abs().sum()) == 0.0


@needs_compiler
def test_rope_kv_refuses_a_position_outside_the_table() -> None:
    from tokenmill.layers.rotary import RotaryEmbedding

    kernel = cpu_kernels()
    assert kernel is not None
    rot = RotaryEmbedding(8, 16, 10000.0)
    cos, sin = rot.tables(torch.float32)
    qkv = torch.randn(2, 4 * 8)  # 2 query heads, 1 KV head
    cache = torch.zeros(2, 1, 4, 4, 8)
    before = qkv.clone()
    with pytest.raises(IndexError, match="position 16"):
        kernel.rope_kv(qkv, torch.tensor([3, 16]), cos, sin, cache, torch.tensor([0, 1]), 2)
    assert torch.equal(qkv, before) and not cache.any()  # nothing written


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    kern = cpu_kernels()
    assert kern is not None
    gen = torch.Generator().manual_seed(7)
    gu = (torch.randn(37, 2 * 1100, generator=gen) * 6).to(dtype)  # 3 column chunks per row
    gu[0, :4] = torch.tensor([0.0, -100.0, 100.0, -88.0]).to(dtype)  # exp's edges
    gate, up = gu.split(1100, dim=1)
    want = torch.nn.functional.silu(gate) * up
    got = kern.silu_mul(gu)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # torch's roundings: equal but where the float silu sits on a bf16 rounding edge
        assert (got != want).float().mean() < 0.01
        torch.testing.assert_close(got.float(), want.float(), atol=0.02, rtol=0.02)
    assert torch.equal(kern.silu_mul(gu[5:6]), got[5:6])  # rows do not depend on the batch


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_is_torchs_first_largest(dtype: torch.dtype) -> None:
    kern = cpu_kernels()
    assert kern is not None
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(9, 1100, generator=gen).to(dtype)
    cases = [
        wide[:, :1000],  # a row stride wider than the row (a padded head's logits)
        torch.randint(0, 3, (33, 1000), generator=gen).to(dtype),  # ties everywhere: lowest id
        torch.randn(7, 5, generator=gen).to(dtype),  # shorter than one vector
        torch.randn(7, 37, generator=gen).to(dtype),  # vector part + tail
    ]
    edge = torch.full((5, 40), float("-inf"), dtype=dtype)
    edge[1, 20], edge[2, 39], edge[3, 3] = 0.0, -1.0, float("inf")  # -inf rows: first index
    edge[4, 17:] = 2.0  # the largest first appears in the tail of the vector loop
    cases.append(edge)
    for x in cases:
        assert kern.supports_argmax(x)
        assert torch.equal(kern.argmax(x), x.float().argmax(dim=-1))
    assert torch.equal(kern.argmax(wide[4:5, :1000]), kern.argmax(wide[:, :1000])[4:5])
    for n in (1000, 1, 1100, 5000):  # the first n columns (a padded head's logits)
        assert torch.equal(kern.argmax(wide, n), wide[:, :n].float().argmax(dim=-1))


def test_ctypes_signatures_come_from_the_header() -> None:
    sigs = cpu.header_signatures(cpu.HEADERS[0].read_text())
    restype, args = sigs["tm_paged_decode_bf16"]
    assert restype is None and len(args) == 19
    assert args[0] is ctypes.c_void_p and args[1] is ctypes.c_int64
    assert args[15] is ctypes.c_float and args[18] is ctypes.c_int
    assert sigs["tm_rope_kv_f32"][0] is ctypes.c_int64 and sigs["tm_abi_version"] == (
        ctypes.c_int, [])
    with pytest.raises(ValueError, match="no ctypes mapping"):
        cpu.header_signatures('extern "C" {\nvoid tm_x(double);\n}')


@needs_compiler
def test_every_exported_entry_point_is_declared(tmp_path: Path) -> None:
    lib = build(tmp_path)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    out = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True,
                         text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " tm_" in line}
    declared = set(cpu.header_signatures(cpu.HEADERS[0].read_text()))
    assert exported == declared
