"""The Triton paged attention kernel (layers/triton_attention.py) against the torch path
(gather + SDPA / batched matmuls) in triton's CPU interpreter, and on CUDA when there is one.
triton is optional: without it the kernel tests skip.

As in tests/lora/test_lora_triton.py, the interpreter must be chosen before triton is imported,
so the interpreted tests run in a child pytest with TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_child import run_ptx_child, run_pytest_child
from tokenmill.kernels.triton_support import triton_available
from tokenmill.layers import kv_int8
from tokenmill.layers import triton_attention as ta
from tokenmill.layers.attention import (
    DeviceRows,
    TorchPagedAttention,
    get_attention_backend,
    to_cache_dtype,
)
from tokenmill.layers.triton_attention import (
    BLOCK_Q_PREFILL,
    TritonPagedAttention,
    build_device_rows,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PTX_CHILD = os.environ.get("TOKENMILL_PTX_CHILD") == "1"
in_ptx_child = pytest.mark.skipif(not PTX_CHILD,
                                  reason="runs in test_ptx_compile_in_a_child's child")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in test_interpreted_kernel's child")


@needs_triton
@pytest.mark.skipif(INTERPRET, reason="this is the child")
def test_interpreted_kernel() -> None:
    run_pytest_child(__file__, ["-k", "interpreted_kernel_"],
                     {"TRITON_INTERPRET": "1"})


def test_device_rows_list_every_query_block() -> None:
    # a decode, a 40-token prefill (3 blocks of 16), 6 tokens after 13 cached
    rows = build_device_rows([1, 40, 6], [9, 40, 19], [[3, 4, 5], list(range(6, 16)), [0, 1, 2]],
                             4, None, torch.device("cpu"))
    assert rows.block_q == BLOCK_Q_PREFILL == 16
    assert rows.qblocks.tolist() == [[0, 0], [1, 0], [1, 16], [1, 32], [2, 0]]
    assert rows.seqs.tolist() == [[0, 1, 9], [1, 40, 40], [41, 6, 19]]
    assert rows.tables.shape == (3, 10) and rows.tables[0].tolist() == [3, 4, 5] + [0] * 7
    assert rows.window == 0 and rows.qblocks.dtype == torch.int32
    decode = build_device_rows([1, 1], [5, 7], [[0, 1], [2, 3]], 4, 3, torch.device("cpu"))
    assert decode.block_q == 1 and decode.qblocks.tolist() == [[0, 0], [1, 0]]
    assert decode.window == 3


def test_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert get_attention_backend("auto", cpu).name == "torch-sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash", cpu)
    if not INTERPRET:
        with pytest.raises(ValueError, match="needs triton and a CUDA device"):
            get_attention_backend("triton", cpu)


def _step(seed: int, qlens: list[int], ctxs: list[int], hq: int, hk: int, d: int, bs: int,
          dtype: torch.dtype, device: torch.device, kv8: bool = False,
          fp8: torch.dtype | None = None
          ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-c // bs) for c in ctxs]
    n_blocks = sum(per_seq) + 3
    ids = random.Random(seed).sample(range(n_blocks), n_blocks)  # scattered tables
    tables, at = [], 0
    for n in per_seq:
        tables.append(ids[at:at + n])
        at += n
    cache = torch.randn(2, hk, n_blocks, bs, d, generator=gen).to(dtype).to(device)
    if kv8:  # the same values in the int8 cache's layout
        flat = cache.view(2, hk, n_blocks * bs, d).transpose(1, 2)
        cache = torch.zeros(2, hk, n_blocks, kv_int8.block_bytes(bs, d), dtype=torch.int8,
                            device=device)
        kv_int8.write(cache, flat[0], flat[1], torch.arange(n_blocks * bs, device=device))
    if fp8 is not None:  # some keys past the type's range: they must saturate
        cache[0, 0, 0, 0, :3] = torch.tensor([1e4, -1e4, 500.0])
        cache = to_cache_dtype(cache, fp8)
    t = sum(qlens)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(dtype).to(device) for h in (hq, hk, hk))
    return tables, cache, q, k, v


def _compare(qlens: list[int], ctxs: list[int], hq: int, hk: int, d: int, bs: int,
             window: int | None, dtype: torch.dtype, device: torch.device,
             kv8: bool = False, fp8: torch.dtype | None = None) -> None:
    tables, cache, q, k, v = _step(0, qlens, ctxs, hq, hk, d, bs, dtype, device, kv8, fp8)
    scale = d ** -0.5
    tri, ref = TritonPagedAttention(), TorchPagedAttention()
    meta = tri.build_metadata(qlens, ctxs, tables, bs, window, device)
    assert meta.device_rows is not None and meta.rows is None
    tri_cache = cache.clone()
    got = tri.forward(q, k, v, tri_cache, meta, scale)
    ref_meta = ref.build_metadata(qlens, ctxs, tables, bs, window, device)
    ref_meta.rows = None  # gather + SDPA, not the native CPU kernel
    want = ref.forward(q, k, v, cache, ref_meta, scale)
    assert torch.equal(tri_cache.view(torch.uint8), cache.view(torch.uint8))  # same writes
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


# two decodes, a fresh 21-token prefill (two query blocks), 6 new tokens after 13 cached
MIXED = ([1, 1, 21, 6], [9, 30, 21, 19])
DECODE = ([1, 1, 1], [5, 17, 33])


@interpreted
@pytest.mark.parametrize("step", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (8, 2)], ids=["g3", "g1", "g4"])
@pytest.mark.parametrize("window", [None, 5])
def test_interpreted_kernel_matches_torch(step: tuple[list[int], list[int]],
                                          heads: tuple[int, int], window: int | None) -> None:
    _compare(*step, *heads, 64, 4, window, torch.float32, torch.device("cpu"))


@interpreted
@pytest.mark.parametrize("step", [MIXED, DECODE, ([1, 1], [700, 1300])],
                         ids=["mixed", "decode", "split"])
@pytest.mark.parametrize("d, bs, window", [(64, 16, None), (96, 32, 5), (128, 16, 20)])
def test_interpreted_kernel_int8_cache_matches_torch(step: tuple[list[int], list[int]], d: int,
                                              bs: int, window: int | None) -> None:
    """The int8 KV cache (`--kv-cache-dtype int8`) read by the kernel, dequantized as it
    loads, against the torch path's dequantizing gather over the same bytes; decode, prefill,
    windows, and split keys over long contexts."""
    _compare(*step, 6, 2, d, bs, window, torch.float32, torch.device("cpu"), kv8=True)


@interpreted
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("step", [MIXED, DECODE], ids=["mixed", "decode"])
def test_interpreted_kernel_fp8_cache_matches_torch(step: tuple[list[int], list[int]],
                                                    fp8: torch.dtype) -> None:
    """A float8 cache (`--kv-cache-dtype fp8_e4m3fn` / `fp8_e5m2`) widened as the kernel loads
    it, against the torch path's widening gather over the same bytes (saturated keys
    included); bfloat16 queries, as on a GPU."""
    _compare(*step, 6, 2, 64, 16, None, torch.bfloat16, torch.device("cpu"), fp8=fp8)


@interpreted
@pytest.mark.parametrize("window", [None, 600])
@pytest.mark.parametrize("sms", [4, 32])
def test_interpreted_kernel_split_keys_match_torch(window: int | None, sms: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode rows over long contexts with few (sequence, KV head) programs: the keys are
    split over several programs per pair (flash-decoding) and merged; a window moves each
    split's range. `sms` stands for the GPU's SM count, which sets how many splits."""
    monkeypatch.setattr(ta, "_sm_count", lambda device: sms)
    qlens, ctxs = [1, 1], [700, 1300]
    keys = min(max(ctxs), window or max(ctxs))
    assert ta.decode_splits(2 * 2, keys, torch.device("cpu")) == (2 if sms == 4 else keys // 256)
    _compare(qlens, ctxs, 6, 2, 64, 16, window, torch.float32, torch.device("cpu"))


def test_split_counts() -> None:
    cpu = torch.device("cpu")  # 4 "SMs" for the interpreter: 8 programs wanted
    assert ta.decode_splits(8, 10_000, cpu) == 1  # the batch fills the GPU
    assert ta.decode_splits(2, 100, cpu) == 1  # too few keys to share
    assert ta.decode_splits(2, 10_000, cpu) == 4
    assert ta.decode_splits(1, 100_000, cpu) == 8


@interpreted
@pytest.mark.parametrize("d, bs", [(80, 16), (32, 8)])
def test_interpreted_kernel_odd_shapes(d: int, bs: int) -> None:
    """A head dim that is not a power of two, bfloat16 storage, another block size."""
    _compare(*MIXED, 6, 2, d, bs, None, torch.bfloat16, torch.device("cpu"))


@pytest.mark.skipif(INTERPRET or PTX_CHILD, reason="this is a child")
def test_ptx_compile_in_a_child() -> None:
    pytest.importorskip("triton")
    run_ptx_child(__file__, "compiles_for_sm90")


@needs_triton
def _tiny_model(max_positions: int, bs: int, nb: int) -> tuple[Any, TritonPagedAttention,
                                                               torch.Tensor]:
    """A 2-layer float32 model on the Triton backend (GQA 6/2) with random weights, bound to
    a random cache of nb blocks of bs plus the scratch block: (model, backend, cache)."""
    from tokenmill.models.llama import ArchConfig, LlamaForCausalLM
    from tokenmill.runner.loading import init_dummy_weights

    arch = ArchConfig.from_hf(dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2,
                                   vocab_size=300, max_position_embeddings=max_positions))
    backend = TritonPagedAttention()
    model = LlamaForCausalLM(arch, backend).eval()
    init_dummy_weights(model, seed=1)
    cache = torch.randn(*model.kv_cache_shape(nb + 1, bs),
                        generator=torch.Generator().manual_seed(2))
    model.bind_kv_cache(cache)
    return model, backend, cache


@interpreted
def test_interpreted_kernel_cuda_graph_split_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step that splits its keys replays too: the small bucket is also recorded with
    the most splits its batch could want (4 here: 4 "SMs", 2 KV heads), and a long-context
    row run through it gives the plain forward's hidden states (whose eager step splits 2
    ways); a short one takes the bucket's unsplit variant."""
    from tokenmill.runner.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(ta, "_sm_count", lambda device: 4)
    bs, nb = 16, 48
    model, backend, _ = _tiny_model(1024, bs, nb)
    cpu = torch.device("cpu")
    graphs = DecodeGraphs(model, cpu, [1, 4], nb, nb * bs, None, eager=True)
    assert graphs.splits == {1: 4, 4: 1}
    assert graphs.capture() and set(graphs._run) == {(1, 1), (1, 4), (4, 1)}
    used: list[int] = []
    real = ta.paged_attention

    def spy(q: torch.Tensor, kv: torch.Tensor, rows: DeviceRows, scale: float) -> torch.Tensor:
        used.append(rows.splits)
        return real(q, kv, rows, scale)

    monkeypatch.setattr(ta, "paged_attention", spy)
    for ctx, splits in ((700, 4), (40, 1)):
        assert ta.decode_splits(2, ctx, cpu) == (2 if ctx == 700 else 1)
        meta = backend.build_metadata([1], [ctx], [list(range(nb))[: -(-ctx // bs)]], bs, None,
                                      cpu)
        ids, pos = torch.tensor([7]), torch.tensor([ctx - 1])
        with torch.inference_mode():
            want = model(ids, pos, meta)
            used.clear()
            got = graphs.run(ids, pos, meta)
        assert used == [splits] * 2  # each layer's attention, with the variant's splits
        assert got is not None
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@in_ptx_child
# Each cache kind with both activation dtypes and both program shapes (decode, prefill block),
# each (dtype, shape) pair with two cache kinds: 8 of the 16 combinations, ~2 s a compile;
# decode programs with split keys, and two without (large batches, CUDA graphs' plain variant).
@pytest.mark.parametrize(("dtype", "block_q", "cache", "split"), [
    ("fp32", 1, "model", True), ("bf16", BLOCK_Q_PREFILL, "model", False),
    ("bf16", 1, "i8", True), ("fp32", BLOCK_Q_PREFILL, "i8", False),
    ("fp32", 1, "fp8e4nv", True), ("bf16", BLOCK_Q_PREFILL, "fp8e4nv", False),
    ("bf16", 1, "fp8e5", True), ("fp32", BLOCK_Q_PREFILL, "fp8e5", False),
    ("bf16", 1, "model", False), ("bf16", 1, "i8", False)])
def test_kernel_compiles_for_sm90(dtype: str, block_q: int, cache: str, split: bool,
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU needed: ahead-of-time compilation to PTX catches what the interpreter does not
    check (tl.dot shapes and dtypes, constexpr handling), and shows the tensor cores used."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tokenmill.layers import triton_attention as ta

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = ta._kernel()
    kv8 = cache == "i8"
    if cache == "model":
        cache = dtype
    ptr = {"q_ptr": dtype, "k_ptr": cache, "v_ptr": cache, "o_ptr": dtype, "tables_ptr": "i32",
           "qblocks_ptr": "i32", "seqs_ptr": "i32", "part_ptr": "fp32", "m_ptr": "fp32",
           "l_ptr": "fp32", "ks_ptr": "fp32", "vs_ptr": "fp32"}
    consts = {"BLOCK_Q": block_q, "G_PAD": 4, "M": max(16, 4 * block_q), "BLOCK_N": ta.BLOCK_N,
              "D_PAD": 128, "UPCAST": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
              "SPLIT": split,
              "KV8": kv8}
    sig = {n: f"*{ptr[n]}" if n in ptr else "constexpr" if n in consts
           else "fp32" if n == "scale" else "i32" for n in kernel.arg_names}
    src = ASTSource(kernel, sig, constexprs={n: consts[n] for n in sig if n in consts})
    ptx = triton_compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert ("mma" in ptx) == (dtype == "bf16")  # fp32 with "ieee": exact FMA, no TF32


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("cache", ["model", "int8", "fp8"])
def test_cuda_kernel_matches_torch(window: int | None, cache: str) -> None:
    qlens = [1] * 24 + [200, 37]
    ctxs = [random.Random(i).randint(1, 900) for i in range(24)] + [200, 400]
    _compare(qlens, ctxs, 32, 8, 128, 16, window, torch.bfloat16, torch.device("cuda"),
             kv8=cache == "int8", fp8=torch.float8_e4m3fn if cache == "fp8" else None)


@interpreted
def test_interpreted_kernel_cuda_graph_padding() -> None:
    """The CUDA-graph decode path's static buffers, run eagerly: a 3-row step in the 4-row
    bucket (one padding row) gives the plain forward's hidden states and cache writes, and the
    padding row writes only into the scratch block."""
    from tokenmill.runner.cuda_graphs import DecodeGraphs

    bs, nb = 4, 12
    model, backend, cache = _tiny_model(128, bs, nb)
    ctxs, tables = [5, 9, 2], [[3, 7], [0, 1, 11], [5]]
    meta = backend.build_metadata([1, 1, 1], ctxs, tables, bs, None, torch.device("cpu"))
    ids, pos = torch.tensor([11, 22, 33]), torch.tensor([c - 1 for c in ctxs])
    before = cache.clone()
    with torch.inference_mode():
        want = model(ids, pos, meta)
        after = cache.clone()
        cache.copy_(before)
        graphs = DecodeGraphs(model, torch.device("cpu"), [1, 4], 8, nb * bs, None, eager=True)
        assert graphs.capture() and graphs.bucket(3) == 4 and graphs.bucket(5) is None
        got = graphs.run(ids, pos, meta)
    assert got is not None and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    real = slice(0, nb)  # every block but the scratch one
    torch.testing.assert_close(cache[:, :, :, real], after[:, :, :, real], atol=1e-5, rtol=1e-5)
    assert not torch.equal(cache[:, :, :, nb], before[:, :, :, nb])  # the padding row's K/V
    prefill = backend.build_metadata([3], [3], [[2]], bs, None, torch.device("cpu"))
    assert graphs.run(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), prefill) is None


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replay_matches_eager() -> None:
    from tokenmill.models.llama import ArchConfig, LlamaForCausalLM
    from tokenmill.runner.cuda_graphs import DecodeGraphs
    from tokenmill.runner.loading import init_dummy_weights

    dev = torch.device("cuda")
    arch = ArchConfig.from_hf(dict(hidden_size=512, intermediate_size=1024,
                                   num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=1000,
                                   max_position_embeddings=1024))
    backend = TritonPagedAttention()
    with torch.device(dev):
        model = LlamaForCausalLM(arch, backend).to(torch.bfloat16).eval()
    init_dummy_weights(model, seed=1)
    bs, nb = 16, 5 * 64  # up to 64 blocks for each of up to 5 rows
    cache = torch.randn(*model.kv_cache_shape(nb + 1, bs), device=dev).to(torch.bfloat16)
    model.bind_kv_cache(cache)
    with torch.inference_mode():
        graphs = DecodeGraphs(model, dev, [1, 8], 64, nb * bs, None)
        assert graphs.capture()
        # 5 rows in the 8-row bucket; then one row at a long context, which splits its keys
        # (the bucket's split-key graph)
        for ctxs in ([5, 90, 33, 17, 250], [1000]):
            tables = [list(range(i * 64, i * 64 + 64))[: -(-c // bs)] for i, c in enumerate(ctxs)]
            meta = backend.build_metadata([1] * len(ctxs), ctxs, tables, bs, None, dev)
            ids = torch.tensor([11, 22, 33, 44, 55][: len(ctxs)], device=dev)
            pos = torch.tensor([c - 1 for c in ctxs], device=dev)
            want = model(ids, pos, meta).float()
            got = graphs.run(ids, pos, meta)
            assert got is not None
            torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@interpreted
def test_interpreted_kernel_self_check() -> None:
    from tokenmill.layers.triton_attention import self_check

    assert self_check(torch.device("cpu")) is None
    for cache in ("int8", "fp8_e4m3fn", "fp8_e5m2"):
        assert self_check(torch.device("cpu"), cache) is None


def test_self_check_catches_a_broken_kernel(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The auto backend takes Triton on CUDA only when its kernel agrees with the torch path:
    a kernel that fails or computes garbage leaves gather + SDPA, with a warning."""
    from tokenmill.layers import attention
    from tokenmill.layers import triton_attention as ta

    def boom(*args: object) -> torch.Tensor:
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(ta, "paged_attention", boom)
    assert "RuntimeError: no kernel image" in (ta.self_check(torch.device("cpu")) or "")
    monkeypatch.setattr(ta, "paged_attention", lambda q, *a: torch.zeros_like(q))
    assert "differs from the torch path" in (ta.self_check(torch.device("cpu")) or "")
    monkeypatch.setattr(attention, "triton_available", lambda: True)
    backend = get_attention_backend("auto", torch.device("cuda"))  # nothing runs on it
    assert backend.name == "torch-sdpa" and "failed its check" in caplog.text
