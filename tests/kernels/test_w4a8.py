"""The int4 x int8 and int8 x int8 kernels (`--quantize w4a8`, kernels/csrc/w4a8.cpp): their
packed layouts, their arithmetic against a float64 reference that rounds the activations the
same way, batch invariance, and the AVX2 and scalar builds giving the native build's bits."""

from __future__ import annotations

import ctypes
import platform
import shutil
from pathlib import Path

import pytest
import torch

from tokenmill.kernels.cpu import FLAGS, CpuKernels, build, cpu_kernels
from tokenmill.layers import kv_int8
from tokenmill.layers.attention import TorchPagedAttention
from tokenmill.layers.dense import TiledWeight
from tokenmill.layers.quant import (
    GROUP_SIZE,
    ResidualWeight,
    W4A8Weight,
    W8A8Weight,
    int4_groups,
    quantize_activations,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler on this machine")


def _reference(x: torch.Tensor, ref_w: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it (int8 per group of 32), times the dequantized weight,
    in float64."""
    a8, d = quantize_activations(x)
    m, k = x.shape
    xq = (a8.double().view(m, k // GROUP_SIZE, GROUP_SIZE) * d.double().unsqueeze(-1))
    return xq.view(m, k) @ ref_w.double().t()


def test_pack_puts_each_nibble_where_the_kernel_reads_it() -> None:
    gen = torch.Generator().manual_seed(0)
    n, k = 32, 64
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    sz = torch.randn(n, k // 32, 2, generator=gen).to(torch.bfloat16)
    packed, scales = W4A8Weight.pack(q, sz)
    assert packed.shape == (2, 2, 256) and scales.shape == (2, 2, 16, 2)
    for row, col in [(0, 0), (5, 3), (17, 36), (31, 63), (9, 50)]:
        tile, r, g, kk = row // 16, row % 16, col // 32, col % 32
        half, j, i = kk // 16, kk % 16 // 4, kk % 4
        byte = int(packed[tile, g, 64 * j + 4 * r + i])
        assert (byte >> 4 if half else byte & 15) == int(q[row, col])
        assert torch.equal(scales[tile, g, r], sz[row, g])


def test_int8_pack_puts_each_byte_where_the_kernel_reads_it() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (32, 64), generator=gen, dtype=torch.int32)
    d = torch.rand(32, 2, generator=gen)
    packed, scales = W8A8Weight.pack(q, d)
    assert packed.shape == (2, 2, 512) and scales.shape == (2, 2, 16)
    for row, col in [(0, 0), (5, 3), (17, 36), (31, 63)]:
        tile, r, g, kk = row // 16, row % 16, col // 32, col % 32
        assert int(packed[tile, g, 64 * (kk // 4) + 4 * r + kk % 4]) == int(q[row, col]) + 128
        assert scales[tile, g, r] == d[row, g]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,m", [(16, 32, 1), (48, 576, 5), (32, 64, 150)])
def test_int8_kernel_equals_its_reference(n: int, k: int, m: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=gen)
    w[2, :32] = 0  # an all-zero group: d = 0
    qw, ref_w = W8A8Weight.quantize(w, dtype)
    assert (ref_w - w).abs().max() <= w.abs().max() / 254 + 1e-6  # half a step of 8 bits
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = qw.matmul(x)
    assert y.dtype == dtype and y.shape == (m, n)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), _reference(x, ref_w), atol=1e-4, rtol=1e-5)
    else:
        torch.testing.assert_close(y.double(), _reference(x, ref_w), atol=1e-3, rtol=2 ** -8)


def test_activation_rounding() -> None:
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5] + [0.25] * 29])
    a8, d = quantize_activations(x)
    assert torch.equal(a8[0, :32], torch.zeros(32)) and d[0, 0] == 0  # an all-zero group
    assert d[0, 1] == pytest.approx(2 / 127)
    assert a8[0, 33] == -127 and a8[0, 32] == 64  # 63.5 rounds half to even
    assert a8[0, 34] == 32 and a8.abs().max() <= 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,m", [(16, 32, 1), (48, 128, 3), (96, 576, 4), (64, 1536, 9),
                                   (32, 64, 150)])  # 150 rows: 3 chunks of <= 64, 8 per pass
def test_kernel_equals_its_reference(n: int, k: int, m: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=gen)
    w[3, :32] = 0.25  # a constant group
    qw, ref_w = W4A8Weight.quantize(w, dtype)
    _, _, expected_ref = int4_groups(w, torch.bfloat16)
    assert torch.equal(ref_w, expected_ref)  # the same int4 weights as --quantize int4's
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[0, :32] = 0  # an all-zero activation group
    y = qw.matmul(x)
    assert y.dtype == dtype and y.shape == (m, n)
    want = _reference(x, ref_w)
    if dtype == torch.float32:  # float32 accumulation over K/32 group terms
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)
    else:  # then rounded once to bfloat16
        torch.testing.assert_close(y.double(), want, atol=1e-3, rtol=2 ** -8)
    # and the activation rounding costs little against the unrounded product
    exact = x.double() @ ref_w.double().t()
    assert (y.double() - exact).abs().max() < 0.02 * exact.abs().max() + 0.05


def test_rows_do_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    qw, _ = W4A8Weight.quantize(torch.randn(64, 256, generator=gen), torch.bfloat16)
    x = torch.randn(75, 256, generator=gen).to(torch.bfloat16)
    alone = torch.cat([qw.matmul(x[i:i + 1]) for i in range(75)])
    assert torch.equal(qw.matmul(x), alone)
    assert torch.equal(qw.matmul(x[::2]), alone[::2])  # strided rows (non-contiguous batch)


def test_residual_head_adds_the_rest() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(32, 128, generator=gen)
    head, ref = ResidualWeight.quantize(w, torch.float32, W4A8Weight)
    assert (ref - w).abs().max() < 0.03  # about 8 bits
    x = torch.randn(2, 128, generator=gen)
    torch.testing.assert_close(head.matmul(x).double(), _reference(x, ref), atol=1e-4, rtol=1e-5)


def test_wrong_width_is_refused() -> None:
    qw, _ = W4A8Weight.quantize(torch.randn(16, 64), torch.float32)
    with pytest.raises(ValueError, match="cannot multiply"):
        qw.matmul(torch.randn(1, 32))


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in have for flag in flags)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glu_epilogue_gives_the_matmul_then_silu_bits(dtype: torch.dtype) -> None:
    """silu(gate) * up inside the matmul (w4a8 and dense tiles): bit for bit the matmul's
    [gate | up] output followed by the SiLU · up kernel, for row counts that fill and split
    the row passes and 64-row chunks; with SiLU arguments across both signs and a zero row."""
    kernels = cpu_kernels()
    assert kernels is not None
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(96, 192, generator=gen)  # [gate (48) | up (48)]: 3 tiles a half
    q4, _ = W4A8Weight.quantize(w, torch.bfloat16)
    tiled = TiledWeight(w.to(dtype), kernels)
    for m in (1, 2, 3, 4, 7, 8, 9, 70, 130):  # below 4 rows w4a8 takes the two steps itself
        x = (3 * torch.randn(m, 192, generator=gen)).to(dtype)
        x[m // 2] = 0
        assert torch.equal(q4.glu(x), kernels.silu_mul(q4.matmul(x))), m
        assert torch.equal(tiled.glu(x), kernels.silu_mul(tiled.matmul(x, None))), m
    with pytest.raises(ValueError, match="glu"):
        W4A8Weight.quantize(torch.randn(48, 64), torch.bfloat16)[0].glu(torch.randn(2, 64))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 flags")
@pytest.mark.parametrize(("march", "avx2"), [("x86-64-v2", False), ("x86-64-v3", True),
                                             ("skylake-avx512", True)])
def test_other_builds_give_the_same_bits(tmp_path: Path, march: str, avx2: bool) -> None:
    """The native build (VNNI, or AVX2 on a CPU without it) against the scalar loop
    (x86-64-v2), the AVX2 path (x86-64-v3) and AVX-512 without VNNI or BF16 (skylake-avx512:
    the AVX2 tiles, AVX-512 attention loops): the same integer sums and float operations,
    so the same bits, for 1 to 9 and 70 rows (every rows-per-pass case, partial passes, two
    64-row chunks), with all-zero weight and activation groups."""
    if avx2 and not _cpu_has("avx2", "fma"):
        pytest.skip("no AVX2 and FMA on this CPU")
    if march == "skylake-avx512" and not _cpu_has("avx512f", "avx512bw", "avx512dq",
                                                  "avx512vl", "avx512cd"):
        pytest.skip("no AVX-512 (F, BW, DQ, VL, CD) on this CPU")
    native = cpu_kernels()
    assert native is not None
    flags = tuple(f"-march={march}" if f == "-march=native" else f for f in FLAGS)
    path = build(tmp_path, flags)
    other = CpuKernels(ctypes.CDLL(str(path)), path)
    assert not other.w4a8_vnni and other.w4a8_avx2 == avx2
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 192, generator=gen)
    w[7, 32:64] = 0
    q4, _ = W4A8Weight.quantize(w, torch.bfloat16)
    q8, _ = W8A8Weight.quantize(w, torch.bfloat16)
    glu, _ = W4A8Weight.quantize(torch.randn(64, 192, generator=gen), torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (*range(1, 10), 70):
            x = (3 * torch.randn(m, 192, generator=gen)).to(dtype)
            x[m // 2, 64:96] = 0
            assert torch.equal(native.w4a8_matmul(x, q4.packed, q4.scales),
                               other.w4a8_matmul(x, q4.packed, q4.scales)), (dtype, m)
            assert torch.equal(native.w8a8_matmul(x, q8.packed, q8.scales),
                               other.w8a8_matmul(x, q8.packed, q8.scales)), (dtype, m)
            # the SiLU epilogue: that build's matmul then its SiLU · up (whose exp may round
            # differently from the native build's: FMA contraction)
            assert torch.equal(other.w4a8_glu(x, glu.packed, glu.scales), other.silu_mul(
                other.w4a8_matmul(x, glu.packed, glu.scales))), (dtype, m)
    _other_build_kernels_agree(native, other, gen)


def _other_build_kernels_agree(native: CpuKernels, other: CpuKernels,
                               gen: torch.Generator) -> None:
    """The kernels a decode step also runs, in the other build: its argmax is torch's (ties to
    the lowest id, a tail past the vectors), SiLU and attention over the int8 and float32 caches
    agree with the native build to float rounding (their loops vectorize differently)."""
    logits = torch.randn(5, 1003, generator=gen)
    logits[2, 500:] = logits[2].max()  # ties: the first index wins
    assert torch.equal(other.argmax(logits), logits.argmax(-1))
    gu = 4 * torch.randn(6, 2 * 200, generator=gen)
    torch.testing.assert_close(other.silu_mul(gu), native.silu_mul(gu), rtol=1e-6, atol=1e-6)
    hq, hk, d, bs = 9, 3, 64, 16
    qlens, ctxs = [1, 1, 5], [70, 9, 40]  # two decodes and a prefill chunk
    tables = [[0, 1, 2, 3, 4], [5], [6, 7, 8]]
    meta = TorchPagedAttention().build_metadata(qlens, ctxs, tables, bs, None,
                                                torch.device("cpu"))
    rows = meta.rows
    assert rows is not None
    cache = torch.zeros(2, hk, 9, kv_int8.block_bytes(bs, d), dtype=torch.int8)
    slots = torch.arange(9 * bs)
    kv_int8.write(cache, torch.randn(len(slots), hk, d, generator=gen),
                  torch.randn(len(slots), hk, d, generator=gen), slots)
    q = torch.randn(sum(qlens), hq, d, generator=gen)
    outs = [k.paged_decode(q, cache, rows.tables, rows.bounds, rows.max_keys, d ** -0.5,
                           rows.seq) for k in (native, other)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    # the float32 cache (its 16-key score blocks: AVX-512, AVX2 halves, or the scalar dots),
    # partial blocks at both ends of the prefill chunk's keys
    fcache = torch.randn(2, hk, 9, bs, d, generator=gen)
    outs = [k.paged_decode(q, fcache, rows.tables, rows.bounds, rows.max_keys, d ** -0.5,
                           rows.seq) for k in (native, other)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    # ... and in the other build each row gets its bits alone, float32 and bfloat16 caches
    for dtype in (torch.float32, torch.bfloat16):
        c, qd = fcache.to(dtype), q.to(dtype)
        batch = other.paged_decode(qd, c, rows.tables, rows.bounds, rows.max_keys, d ** -0.5,
                                   rows.seq)
        for i in range(len(qd)):
            lo, hi = rows.bounds[i].tolist()
            alone = other.paged_decode(qd[i:i + 1].contiguous(), c,
                                       rows.tables[rows.seq[i]].unsqueeze(0).contiguous(),
                                       rows.bounds[i:i + 1].contiguous(), hi - lo, d ** -0.5)
            assert torch.equal(alone[0], batch[i]), (dtype, i)
    _other_build_dense_agrees(native, other, gen)


def _other_build_dense_agrees(native: CpuKernels, other: CpuKernels,
                              gen: torch.Generator) -> None:
    """The dense matmul (dense.cpp) in the other build: each output's products in k order
    through one accumulator, whatever the vector width, and bfloat16 widened to the FMAs
    vdpbf16ps performs: the same bits as the native build (no subnormals here)."""
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(96, 200, generator=gen).to(dtype)
        native_w, other_w = TiledWeight(w, native), TiledWeight(w, other)
        for m in (1, 5, 7, 70):
            x = torch.randn(m, 200, generator=gen).to(dtype)
            assert torch.equal(other_w.matmul(x, None), native_w.matmul(x, None)), (dtype, m)
            assert torch.equal(other_w.glu(x), other.silu_mul(other_w.matmul(x, None))), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_path_gives_the_vector_paths_bits(dtype: torch.dtype) -> None:
    """On CPUs with AMX, batches of rows take the tile path (w4a8.cpp): the same integer sums
    and the same float operations, so the same bits as the VNNI loop, for every row count
    (whole and partial 16-row tiles, several 64-row chunks) and both weight kinds."""
    kernels = cpu_kernels()
    assert kernels is not None
    if not kernels.w4a8_amx:
        pytest.skip("no AMX on this CPU (or the OS withholds the tiles)")
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(48, 576, generator=gen)
    w[5, 64:96] = 0  # an all-zero weight group
    q4, _ = W4A8Weight.quantize(w, dtype)
    q8, _ = W8A8Weight.quantize(w, dtype)
    before = kernels.set_amx_rows(-1)
    try:
        for m in (1, 15, 16, 17, 40, 64, 129):
            x = torch.randn(m, 576, generator=gen).to(dtype)
            x[m // 2, 32:64] = 0  # an all-zero activation group
            for q, fn in ((q4, kernels.w4a8_matmul), (q8, kernels.w8a8_matmul)):
                kernels.set_amx_rows(1 << 40)  # never
                vnni = fn(x, q.packed, q.scales)
                kernels.set_amx_rows(1)  # always
                amx = fn(x, q.packed, q.scales)
                assert torch.equal(amx, vnni), (m, q)
    finally:
        kernels.set_amx_rows(before)
