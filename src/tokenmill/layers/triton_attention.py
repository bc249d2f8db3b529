"""Paged attention on CUDA as one Triton kernel for any step: decode rows, fresh prefills and
chunked prefills over cached context, all read straight from the paged cache (no gather, no
padding to the longest context).

The grid is (query blocks, KV heads). `build_device_rows` lists the query blocks, each a
sequence and its first query row, on the host when the step's metadata is built (the runner
knows every length then), so a launch never waits on the device. A program takes BLOCK_Q query
tokens of one sequence with the G query heads that share its KV head, as one tile of
BLOCK_Q * G_PAD rows (GQA: each K/V tile is loaded once for all G heads). It walks the keys
BLOCK_N at a time, looking each key's slot up in the block table, with flash attention's
online softmax in float32, from the first key its rows may see (a sliding window skips the
earlier ones) to the last (causal).

Split keys (flash-decoding): a decode step with too few (sequence, KV head) programs to fill
the GPU (small batch, long contexts) runs `splits` programs per pair, each over its share of
the keys; they write unnormalized partial sums with their softmax maximum and sum, and
`_combine` merges them (a few torch ops, no host sync). `decode_splits` picks the count on
the host from the batch, the longest key range (`DeviceRows.max_keys`) and the GPU's SM
count. CUDA graphs record a bucket once without splits and, where its batch is too small to
fill the GPU, once with the most it could want (`DeviceRows.splits`).

triton is optional (not a project dependency): `TritonPagedAttention` is chosen for CUDA only
when it imports. The tests run the kernel in triton's CPU interpreter against the torch path.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tokenmill.kernels.triton_support import interpreted
from tokenmill.layers import kv_int8
from tokenmill.layers.attention import (
    FLOAT8_CACHES,
    AttentionMetadata,
    DeviceRows,
    TorchPagedAttention,
    to_cache_dtype,
)

# triton.language, bound by `_kernel()`: triton resolves `tl` in a kernel's module globals (the
# interpreter patches it there), so it cannot be a local of the function that defines it.
tl: Any = None

BLOCK_N = 32  # keys per step of the walk
BLOCK_Q_PREFILL = 16  # query tokens per program in a step with a prefill
MIN_ROWS = 16  # tl.dot wants every tile dimension >= 16
SPLIT_MIN_KEYS = 256  # a split-key program walks at least this many keys
MAX_SPLITS = 32


# The jitted K/V loaders, bound by `_kernel()` next to `tl` (a kernel resolves the functions
# it calls in its module's globals too).
_load_kv: Any = None
_load_kv8: Any = None
_softmax_step: Any = None
_store_split: Any = None


@functools.cache
def _kernel() -> Any:
    global tl, _load_kv, _load_kv8, _softmax_step, _store_split
    import triton
    import triton.language as tl

    @triton.jit
    def load_kv(k_base, v_base, blk, offs_n, offs_d, k_ok, v_ok, skb, sko, svb, svo, BS):
        """K^T [D_PAD, BLOCK_N] and V [BLOCK_N, D_PAD] of keys offs_n (in blocks blk) from a
        cache of the model's dtype."""
        k_off = blk * skb + (offs_n % BS) * sko
        v_off = blk * svb + (offs_n % BS) * svo
        k = tl.load(k_base + k_off[None, :] + offs_d[:, None], mask=k_ok, other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=v_ok, other=0.0)
        return k, v

    @triton.jit
    def load_kv8(k_base, v_base, ks_base, vs_base, blk_off, offs_n, offs_d, k_ok, v_ok, D, BS):
        """The same from the int8 cache (layers/kv_int8.py: 16-key sub-blocks of 18 * D bytes
        at byte offset blk_off of the head), dequantized to float32: K as q + 128 in
        [D/4][16][4] bytes, V row-major, each with [D/32][16] float32 scales after the bytes
        (ks_base / vs_base: the head's storage as float32)."""
        u = offs_n % 16
        sub = blk_off + (offs_n % BS) // 16 * (18 * D)  # byte offsets within the head
        kq = tl.load(k_base + sub[None, :] + offs_d[:, None] // 4 * 64 + u[None, :] * 4
                     + offs_d[:, None] % 4, mask=k_ok, other=0)
        ksc = tl.load(ks_base + (sub[None, :] + 16 * D) // 4 + offs_d[:, None] // 32 * 16
                      + u[None, :], mask=k_ok, other=0.0)
        vq = tl.load(v_base + sub[:, None] + u[:, None] * D + offs_d[None, :], mask=v_ok,
                     other=0)
        vsc = tl.load(vs_base + (sub[:, None] + 16 * D) // 4 + offs_d[None, :] // 32 * 16
                      + u[:, None], mask=v_ok, other=0.0)
        k = ((kq.to(tl.int32) & 255) - 128).to(tl.float32) * ksc
        return k, vq.to(tl.float32) * vsc

    @triton.jit
    def softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
        """One step of the online softmax: scores s [M, BLOCK_N] (-inf where a row does not
        see the key) and values v [BLOCK_N, D_PAD] folded into the running max m_i, sum l_i
        and unnormalized output acc."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def store_split(part_ptr, m_ptr, l_ptr, acc, m_i, l_i, split, row, head, row_ok, offs_d,
                    T, HQ, D_PAD: tl.constexpr):
        """A split-key program's partial result, unnormalized with its running max and sum,
        for _combine: [splits, T, Hq] flat."""
        part = (split * T + row) * HQ + head
        tl.store(part_ptr + part[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)

    _load_kv, _load_kv8 = load_kv, load_kv8
    _softmax_step, _store_split = softmax_step, store_split

    @triton.jit
    def paged_attention(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, qblocks_ptr, seqs_ptr,
                        part_ptr, m_ptr, l_ptr, ks_ptr, vs_ptr,
                        scale, window, G, D, BS, T, HQ, n_splits,
                        sqt, sqh, skh, skb, sko, svh, svb, svo, sot, soh, st,
                        BLOCK_Q: tl.constexpr, G_PAD: tl.constexpr, M: tl.constexpr,
                        BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, SPLIT: tl.constexpr, KV8: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        seq = tl.load(qblocks_ptr + 2 * pid)
        first = tl.load(qblocks_ptr + 2 * pid + 1)  # the block's first query, within its sequence
        q_start = tl.load(seqs_ptr + 3 * seq)  # the sequence's first row in the flat batch
        q_len = tl.load(seqs_ptr + 3 * seq + 1)
        ctx = tl.load(seqs_ptr + 3 * seq + 2)  # keys in the cache, this step's included

        offs_m = tl.arange(0, M)  # M = max(BLOCK_Q * G_PAD, 16): tl.dot's smallest tile
        tok = first + offs_m // G_PAD
        g = offs_m % G_PAD
        row_ok = (tok < q_len) & (tok < first + BLOCK_Q) & (g < G)
        pos = ctx - q_len + tok  # each row's position: it sees keys <= pos
        head = h * G + g
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        row = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + row[:, None] * sqt + head[:, None] * sqh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot is numpy's: no bfloat16
            q = q.to(tl.float32)

        last = tl.minimum(first + BLOCK_Q, q_len) - 1
        hi = ctx - q_len + last + 1  # keys [lo, hi) cover every row of the block
        lo = 0
        if window > 0:
            lo = tl.maximum(ctx - q_len + first - window + 1, 0)
        lo = lo // BLOCK_N * BLOCK_N
        if SPLIT:  # this program's share of [lo, hi), whole BLOCK_N steps
            chunk = tl.cdiv(tl.cdiv(hi - lo, n_splits), BLOCK_N) * BLOCK_N
            lo = lo + split * chunk
            hi = tl.minimum(hi, lo + chunk)

        m_i = tl.full((M,), float("-inf"), tl.float32)
        l_i = tl.zeros((M,), tl.float32)
        acc = tl.zeros((M, D_PAD), tl.float32)
        k_base = k_ptr + h.to(tl.int64) * skh
        v_base = v_ptr + h.to(tl.int64) * svh
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            key_ok = offs_n < hi
            blk = tl.load(tables_ptr + seq.to(tl.int64) * st + offs_n // BS, mask=key_ok,
                          other=0).to(tl.int64)
            k_ok = key_ok[None, :] & d_ok[:, None]
            v_ok = key_ok[:, None] & d_ok[None, :]
            if KV8:
                k, v = _load_kv8(k_base, v_base, ks_ptr + h.to(tl.int64) * skh // 4,
                                 vs_ptr + h.to(tl.int64) * svh // 4, blk * skb, offs_n, offs_d,
                                 k_ok, v_ok, D, BS)
                if not UPCAST:
                    k, v = k.to(q.dtype), v.to(q.dtype)
            else:  # the model's dtype, or float8 widened to it (no-op casts otherwise)
                k, v = _load_kv(k_base, v_base, blk, offs_n, offs_d, k_ok, v_ok, skb, sko,
                                svb, svo, BS)
                k, v = k.to(q.dtype), v.to(q.dtype)
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            see = key_ok[None, :] & (offs_n[None, :] <= pos[:, None])
            if window > 0:
                see = see & (offs_n[None, :] > pos[:, None] - window)
            m_i, l_i, acc = _softmax_step(tl.where(see, s, float("-inf")), v, m_i, l_i, acc,
                                          PRECISION)
        if SPLIT:
            _store_split(part_ptr, m_ptr, l_ptr, acc, m_i, l_i, split, row, head, row_ok,
                         offs_d, T, HQ, D_PAD)
        else:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptr + row[:, None] * sot + head[:, None] * soh + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    return paged_attention


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, rows: DeviceRows,
                    scale: float) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]; kv_cache [2, Hk, n_blocks, bs, D] of q's dtype or float8,
    or the int8 cache [2, Hk, n_blocks, bytes] (both widened as they are read), this step's
    keys already written.
    `rows` from `build_device_rows` for the same step."""
    t, hq, d = q.shape
    hk, g = kv_cache.shape[1], hq // kv_cache.shape[1]
    out = torch.empty_like(q)
    if t == 0 or rows.qblocks.shape[0] == 0:
        return out
    k, v = kv_cache[0], kv_cache[1]
    kv8 = kv_cache.dtype == torch.int8
    if kv8:  # the same bytes, also as float32 for the group scales
        bs = kv_int8.block_size_of(kv_cache, d)
        scales = kv_cache.view(torch.float32)
        ks, vs, sko, svo = scales[0], scales[1], 0, 0
    else:
        bs, ks, vs, sko, svo = kv_cache.shape[3], out, out, k.stride(2), v.stride(2)
    assert k.stride(-1) == 1 and q.stride(2) == 1
    n = (rows.splits or decode_splits(rows.qblocks.shape[0] * hk, rows.max_keys, q.device)) \
        if rows.block_q == 1 else 1
    grid = (rows.qblocks.shape[0], hk, n)
    g_pad, d_pad = _next_pow2(g), max(16, _next_pow2(d))
    part = top = total = out  # unused without splits
    if n > 1:  # rows no program writes merge to zeros
        part = torch.zeros(n, t, hq, d_pad, dtype=torch.float32, device=q.device)
        top = torch.full((n, t, hq), float("-inf"), dtype=torch.float32, device=q.device)
        total = torch.zeros(n, t, hq, dtype=torch.float32, device=q.device)
    _kernel()[grid](q, k, v, out, rows.tables, rows.qblocks, rows.seqs, part, top, total, ks, vs,
                    scale, rows.window, g, d, bs, t, hq, n, q.stride(0), q.stride(1),
                    k.stride(0), k.stride(1), sko, v.stride(0), v.stride(1), svo,
                    out.stride(0), out.stride(1), rows.tables.stride(0), BLOCK_Q=rows.block_q,
                    G_PAD=g_pad, M=max(MIN_ROWS, rows.block_q * g_pad), BLOCK_N=BLOCK_N,
                    D_PAD=d_pad, UPCAST=interpreted(),
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: no TF32
                    SPLIT=n > 1, KV8=kv8)
    if n > 1:
        out.copy_(_combine(part, top, total)[..., :d])
    return out


def _combine(part: torch.Tensor, maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Merge split-key partials [splits, T, Hq, D] (each relative to its own softmax maximum,
    with its own sum) into the softmax-weighted output [T, Hq, D], float32."""
    top = maxes.amax(0)
    w = torch.where(maxes == float("-inf"), 0.0, torch.exp(maxes - top.clamp_min(-1e30)))
    total = (w * sums).sum(0)
    return (w[..., None] * part).sum(0) / torch.where(total > 0, total, 1.0)[..., None]


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # triton's CPU interpreter (tests)


def decode_splits(programs: int, max_keys: int, device: torch.device) -> int:
    """Key splits per (sequence, KV head) of a decode step: enough programs for two per SM
    when the batch alone does not give them, each walking at least SPLIT_MIN_KEYS keys."""
    want = 2 * _sm_count(device)
    if programs >= want:
        return 1
    return max(1, min(-(-want // max(programs, 1)), max_keys // SPLIT_MIN_KEYS, MAX_SPLITS))


class TritonPagedAttention(TorchPagedAttention):
    """The torch backend's metadata and cache writes, with the Triton kernel for attention."""

    name = "triton"

    def build_metadata(self, query_lens: list[int], context_lens: list[int],
                       block_tables: list[list[int]], block_size: int,
                       sliding_window: int | None, device: torch.device) -> AttentionMetadata:
        meta = super().build_metadata(query_lens, context_lens, block_tables, block_size,
                                      sliding_window, device)
        meta.rows = None  # the CPU kernel's view: not this backend's
        meta.device_rows = build_device_rows(query_lens, context_lens, block_tables, block_size,
                                             sliding_window, device)
        return meta

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                kv_written: bool = False) -> torch.Tensor:
        if meta.device_rows is None:
            return super().forward(q, k, v, kv_cache, meta, scale, kv_written)
        if not kv_written:
            self.write_kv(k, v, kv_cache, meta)
        return paged_attention(q, kv_cache, meta.device_rows, scale)


def self_check(device: torch.device, kv_cache_dtype: str = "auto") -> str | None:
    """Run the kernel once on `device` against the torch path (a small mixed step), over a
    plain cache and the engine's `--kv-cache-dtype` one (int8 or float8: those variants are
    compiled only for engines that use them); None when it agrees, else what went wrong. The
    `auto` backend uses Triton only after this passes, so a triton, GPU or driver that cannot
    build the kernel (float8 needs sm89+) costs speed, not the engine."""
    try:
        gen = torch.Generator().manual_seed(0)
        hq, hk, d, bs = 4, 2, 64, 16
        qlens, ctxs, tables = [1, 20], [37, 20], [[0, 1, 2], [3, 4]]
        plain = torch.randn(2, hk, 5, bs, d, generator=gen).to(device)
        caches = [plain]
        if kv_cache_dtype == "int8":
            int8 = torch.zeros(2, hk, 5, kv_int8.block_bytes(bs, d), dtype=torch.int8,
                               device=device)
            flat = plain.view(2, hk, 5 * bs, d).transpose(1, 2)
            kv_int8.write(int8, flat[0], flat[1], torch.arange(5 * bs, device=device))
            caches.append(int8)
        elif kv_cache_dtype in FLOAT8_CACHES:
            caches.append(to_cache_dtype(plain, FLOAT8_CACHES[kv_cache_dtype]))
        q, k, v = (torch.randn(sum(qlens), h, d, generator=gen).to(device) for h in (hq, hk, hk))
        tri, ref = TritonPagedAttention(), TorchPagedAttention()
        err = 0.0
        for cache in caches:
            got = tri.forward(q, k, v, cache.clone(), tri.build_metadata(
                qlens, ctxs, tables, bs, None, device), d ** -0.5)
            ref_meta = ref.build_metadata(qlens, ctxs, tables, bs, None, device)
            ref_meta.rows = None
            want = ref.forward(q, k, v, cache, ref_meta, d ** -0.5)
            err = max(err, float((got - want).abs().max()))
    except Exception as e:  # a compile or launch failure
        return f"{type(e).__name__}: {e}"
    return None if err < 1e-2 else f"differs from the torch path by {err:.3g}"


def build_device_rows(query_lens: list[int], context_lens: list[int],
                      block_tables: list[list[int]], block_size: int, window: int | None,
                      device: torch.device) -> DeviceRows:
    """The kernel's view of a step (device int32 tensors, built from host lists). Query
    tokens per program: one when every row decodes, BLOCK_Q_PREFILL otherwise."""
    block_q = 1 if max(query_lens, default=1) <= 1 else BLOCK_Q_PREFILL
    seqs: list[tuple[int, int, int]] = []
    qblocks: list[tuple[int, int]] = []
    start = 0
    for i, (ql, ctx) in enumerate(zip(query_lens, context_lens)):
        seqs.append((start, ql, ctx))
        qblocks.extend((i, f) for f in range(0, ql, block_q))
        start += ql
    width = max((-(-c // block_size) for c in context_lens), default=1)
    tables = [t[:width] + [0] * (width - len(t[:width])) for t in block_tables]

    def tensor(x: list[Any], cols: int) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32).view(-1, cols).to(device, non_blocking=True)

    keys = max(context_lens, default=0)
    return DeviceRows(qblocks=tensor(qblocks, 2), seqs=tensor(seqs, 3),
                      tables=tensor(tables, width), block_q=block_q, window=window or 0,
                      max_keys=min(keys, window) if window else keys)
