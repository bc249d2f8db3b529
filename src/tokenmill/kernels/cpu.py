"""Native CPU kernels: C++ in `csrc/`, compiled on first use with the system compiler
(`g++ -O3 -march=native -fopenmp`) and called through ctypes with raw pointers.

No torch headers are involved, so a build takes about a second; the library is cached under
`~/.cache/tokenmill/kernels/<key>/` (or `$TOKENMILL_KERNEL_CACHE`), keyed by the source, the
compiler, the flags and the CPU's feature flags, since `-march=native` code may not run on
another CPU. The OpenMP runtime is the one torch already loaded (same soname, libgomp.so.1), so
the kernels share torch's thread pool instead of starting a second one.

Every caller keeps a torch fallback: without a compiler, after a failed build, or with
`TOKENMILL_CPU_KERNELS=0`, `cpu_kernels()` returns None."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from tokenmill.layers import kv_int8

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("lora.cpp", "attention.cpp", "pointwise.cpp", "sampling.cpp",
                             "w4a8.cpp", "dense.cpp", "decode_stack.cpp"))  # one library
_CSRC = Path(__file__).with_name("csrc")
# In the cache key too: every header, tm_kernels.h (the C signatures ctypes binds) first.
HEADERS = (_CSRC / "tm_kernels.h",
           *sorted(p for p in _CSRC.glob("*.h") if p.name != "tm_kernels.h"))
# -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC
# keeps loops with a select (exp_neg's underflow, SiLU's sign, the softmax) scalar on AVX2,
# where there are no mask registers to if-convert them with (SiLU ~10x slower). Values are
# unchanged: IEEE results do not depend on it.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         "-shared", "-fPIC", "-std=c++17")
ABI_VERSION = 19
BUILD_TIMEOUT_S = 180

_C_TYPES: dict[str, Any] = {"int64_t": ctypes.c_int64, "int": ctypes.c_int,
                           "float": ctypes.c_float, "void": None}
_DECL = re.compile(r"^\s*([\w ]+?\**)\s*\b(tm_\w+)\(([^)]*)\);", re.MULTILINE)


def _c_type(decl: str) -> Any:
    """A C parameter or return type of the header's declarations as a ctypes type."""
    if "*" in decl:
        return ctypes.c_void_p
    base = decl.replace("const", "").strip()
    if base not in _C_TYPES:
        raise ValueError(f"tm_kernels.h: no ctypes mapping for {decl!r}")
    return _C_TYPES[base]


def header_signatures(text: str) -> dict[str, tuple[Any, list[Any]]]:
    """name -> (restype, argtypes) for every `tm_*` declaration in the `extern "C"` block of
    tm_kernels.h: the header the C++ definitions are compiled against is the one source of
    the entry points' signatures, so ctypes cannot drift from them."""
    block = text[text.index('extern "C" {'):]
    block = block[:block.index("\n}")]
    sigs: dict[str, tuple[Any, list[Any]]] = {}
    for ret, name, params in _DECL.findall(block):
        args = [p.strip() for p in params.split(",") if p.strip()]
        sigs[name] = (_c_type(ret), [_c_type(p) for p in args])
    return sigs


W4A8_GROUP, W4A8_TILE = 32, 16  # K group (weights and activations), output rows per tile
MAX_DECODE_GROUP_DIM = 4096  # (query heads per KV head) x head_dim: the kernel's stack buffers


class CpuKernels:
    """The loaded library with typed entry points; methods take tensors and check them."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        sigs = header_signatures(HEADERS[0].read_text())

        def bind(name: str) -> Any:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = sigs[name]
            return fn

        def per_dtype(op: str) -> dict[torch.dtype, Any]:
            return {torch.bfloat16: bind(f"tm_{op}_bf16"), torch.float32: bind(f"tm_{op}_f32")}

        self._lora = per_dtype("lora_sgmv")
        self._decode = per_dtype("paged_decode")
        self._norm = per_dtype("add_rmsnorm")
        self._silu = per_dtype("silu_mul")
        self._rope = per_dtype("rope_kv")
        self._rope8 = per_dtype("rope_kv8")  # into the int8 cache (kv8.h)
        self._decode8 = per_dtype("paged_decode_kv8")
        self._w4a8 = per_dtype("w4a8_matmul")
        self._w8a8 = per_dtype("w8a8_matmul")
        self._dense = per_dtype("dense_matmul")
        self._w4a8_glu = per_dtype("w4a8_glu")  # the matmul with a SiLU · up epilogue
        self._dense_glu = per_dtype("dense_glu")
        # bfloat16 dense weights take AVX512-BF16's dot products (else they are widened).
        self.dense_bf16dot = bool(bind("tm_dense_bf16dot")())
        self._argmax = per_dtype("argmax")
        # The quantized matmuls' integer path: AVX-512 VNNI, else AVX2 (vpmaddubsw), else a
        # scalar loop; all give the same bits, the scalar one slowly.
        self.w4a8_vnni = bool(bind("tm_w4a8_vnni")())
        self.w4a8_avx2 = bool(bind("tm_w4a8_avx2")())
        self.w4a8_vector = self.w4a8_vnni or self.w4a8_avx2
        # Intel AMX tiles for batches of rows (w4a8.cpp): the same bits as the VNNI loop.
        self.w4a8_amx = bool(bind("tm_w4a8_amx")())
        self._amx_rows = bind("tm_w4a8_set_amx_rows")
        # The whole decoder stack of a w4a8 decode step (models/fused_stack.py builds the
        # structures it takes).
        self.decode_stack = per_dtype("decode_stack")

    def set_amx_rows(self, rows: int) -> int:
        """Make batches of at least `rows` rows take the AMX path of the quantized matmuls
        (where there is one) and return the previous threshold; -1: no AMX path."""
        return int(self._amx_rows(rows))

    def supports_argmax(self, x: torch.Tensor) -> bool:
        return (x.dtype in self._argmax and x.device.type == "cpu" and x.dim() == 2
                and x.stride(1) == 1 and x.shape[1] < 2**31)

    def argmax(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """x [B, n'] (rows contiguous, any row stride) -> int64 [B], the first largest of each
        row's first n columns (all: None): torch.argmax's answer wherever a row has no NaN."""
        cols = x.shape[1] if n is None else min(n, x.shape[1])
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax[x.dtype](x.data_ptr(), x.stride(0), x.shape[0], cols,
                              out.data_ptr(), torch.get_num_threads())
        return out

    def supports_w4a8(self, x: torch.Tensor) -> bool:
        """x [M, K]: rows contiguous, of a CPU dtype the kernel knows, K a multiple of 32."""
        return (x.dtype in self._w4a8 and x.device.type == "cpu" and x.dim() == 2
                and x.stride(1) == 1 and x.shape[1] % W4A8_GROUP == 0)

    def w4a8_matmul(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor
                    ) -> torch.Tensor:
        """x [M, K] @ W^T -> [M, N] in x's dtype, x quantized to int8 per group of 32 on the
        way (see the C++ source). packed uint8 [N/16, K/32, 256] and scales bfloat16
        [N/16, K/32, 16, 2], contiguous, as `W4A8Weight.pack` lays them out (checked there:
        this runs ~120 times a decode step)."""
        m, k = x.shape
        n = packed.shape[0] * W4A8_TILE
        y = torch.empty(m, n, dtype=x.dtype)
        self._w4a8[x.dtype](x.data_ptr(), x.stride(0), m, k, packed.data_ptr(),
                            scales.data_ptr(), n, y.data_ptr(), n, torch.get_num_threads())
        return y

    def w8a8_matmul(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor
                    ) -> torch.Tensor:
        """As `w4a8_matmul` with int8 weights: packed uint8 [N/16, K/32, 512] and scales
        float32 [N/16, K/32, 16] as `W8A8Weight.pack` lays them out."""
        m, k = x.shape
        n = packed.shape[0] * W4A8_TILE
        y = torch.empty(m, n, dtype=x.dtype)
        self._w8a8[x.dtype](x.data_ptr(), x.stride(0), m, k, packed.data_ptr(),
                            scales.data_ptr(), n, y.data_ptr(), n, torch.get_num_threads())
        return y

    def w4a8_glu(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor
                 ) -> torch.Tensor:
        """silu(gate) * up [M, N/2] of `w4a8_matmul(x, ...)` = [gate | up] [M, N]: the same
        bits as `silu_mul` of that product, in one pass (N/2 a multiple of 16)."""
        m, k = x.shape
        n = packed.shape[0] * W4A8_TILE
        assert n % (2 * W4A8_TILE) == 0, "each half must be whole 16-column tiles"
        y = torch.empty(m, n // 2, dtype=x.dtype)
        self._w4a8_glu[x.dtype](x.data_ptr(), x.stride(0), m, k, packed.data_ptr(),
                                scales.data_ptr(), n, y.data_ptr(), n // 2,
                                torch.get_num_threads())
        return y

    def dense_glu(self, x: torch.Tensor, tiles: torch.Tensor, n: int) -> torch.Tensor:
        """silu(gate) * up [M, n/2] of `dense_matmul(x, tiles, n)`, as `w4a8_glu`."""
        m, k = x.shape
        assert (x.stride(1) == 1 or m == 0) and n % 32 == 0
        y = torch.empty(m, n // 2, dtype=x.dtype)
        if m:
            self._dense_glu[x.dtype](x.data_ptr(), x.stride(0), m, k, tiles.data_ptr(), n,
                                     y.data_ptr(), n // 2, torch.get_num_threads())
        return y

    def dense_matmul(self, x: torch.Tensor, tiles: torch.Tensor, n: int) -> torch.Tensor:
        """x [M, K] (rows contiguous) @ W^T -> [M, N] in x's dtype, W packed in 16-column
        tiles of x's dtype as `TiledWeight` lays them out (layers/dense.py; checked there)."""
        m, k = x.shape
        assert x.stride(1) == 1 or m == 0
        y = torch.empty(m, n, dtype=x.dtype)
        if m:
            self._dense[x.dtype](x.data_ptr(), x.stride(0), m, k, tiles.data_ptr(), n,
                                 y.data_ptr(), n, torch.get_num_threads())
        return y

    def supports_rope_kv(self, qkv: torch.Tensor, kv_cache: torch.Tensor, cos: torch.Tensor,
                         num_heads: int) -> bool:
        """qkv [T, (Hq + 2 Hk) * D] with contiguous rows; kv_cache [2, Hk, n_blocks, bs, D]
        contiguous, of qkv's dtype, or int8 [2, Hk, n_blocks, bytes] (layers/kv_int8.py);
        cos [positions, D]; all of one CPU dtype the kernel knows."""
        hk = kv_cache.shape[1]
        d = qkv.shape[1] // (num_heads + 2 * hk)
        return (qkv.dtype in self._rope and qkv.device.type == "cpu" and qkv.dim() == 2
                and qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * hk) * d
                and cache_matches(kv_cache, qkv.dtype, d) and kv_cache.is_contiguous()
                and cos.dtype == qkv.dtype and cos.is_contiguous() and cos.shape[1] == d
                and d % 2 == 0 and d <= 1024)

    def rope_kv(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
                num_heads: int) -> None:
        """Rotate q and k of `qkv` in place and write k and v into the cache at `slots`.
        A position outside the tables raises IndexError before anything is written."""
        hk, d = kv_cache.shape[1], cos.shape[1]
        head, bs = cache_head(kv_cache, d)
        positions, slots = positions.to(torch.int64).contiguous(), slots.to(torch.int64)
        assert sin.shape == cos.shape and sin.is_contiguous() and slots.is_contiguous()
        assert positions.shape == slots.shape == (qkv.shape[0],)
        fn = (self._rope8 if kv_cache.dtype == torch.int8 else self._rope)[qkv.dtype]
        k_ptr = kv_cache.data_ptr()
        bad = fn(qkv.data_ptr(), qkv.stride(0), qkv.shape[0], num_heads, hk, d,
                 positions.data_ptr(), cos.shape[0], cos.data_ptr(), sin.data_ptr(), k_ptr,
                 k_ptr + hk * head * kv_cache.element_size(), head, bs, slots.data_ptr(),
                 torch.get_num_threads())
        if bad >= 0:
            raise IndexError(f"position {int(positions[bad])} is outside the rotary table "
                             f"({cos.shape[0]} positions)")

    def supports_silu_mul(self, gate_up: torch.Tensor) -> bool:
        """gate_up [M, 2I] of a CPU dtype the kernel knows, rows contiguous."""
        return (gate_up.dtype in self._silu and gate_up.device.type == "cpu"
                and gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up = [gate | up] rows, with `F.silu(gate) * up`'s roundings
        (the exp is the kernel's own, within an ulp of torch's)."""
        m, two_i = gate_up.shape
        act = torch.empty(m, two_i // 2, dtype=gate_up.dtype)
        if gate_up.stride(0) != two_i:
            gate_up = gate_up.contiguous()
        self._silu[gate_up.dtype](gate_up.data_ptr(), act.data_ptr(), m, two_i // 2,
                                  torch.get_num_threads())
        return act

    def supports_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                      weight: torch.Tensor) -> bool:
        """2-D rows of one CPU dtype the kernel knows, each row contiguous."""
        return (x.dtype in self._norm and x.device.type == "cpu" and x.dim() == 2
                and x.stride(1) == 1 and weight.dtype == x.dtype and weight.is_contiguous()
                and weight.shape == (x.shape[1],)
                and (residual is None or (residual.dtype == x.dtype and residual.is_contiguous()
                                          and residual.shape == x.shape)))

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual) * weight, x + residual) as `RMSNorm.forward` computes them."""
        rows, hidden = x.shape
        r_out = torch.empty(rows, hidden, dtype=x.dtype)
        out = torch.empty(rows, hidden, dtype=x.dtype)
        self._norm[x.dtype](x.data_ptr(), x.stride(0),
                            None if residual is None else residual.data_ptr(), r_out.data_ptr(),
                            weight.data_ptr(), out.data_ptr(), rows, hidden, eps,
                            torch.get_num_threads())
        return out, r_out

    def supports_lora(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor) -> bool:
        """Whether `lora_sgmv` takes these operands: one CPU dtype it knows, rows contiguous,
        A [S, R, in] stored as [S, in, R] and B [S, out, R] stored as [S, R, out] (both
        transposed views, as `LoraLinear.resize` makes them)."""
        s, r, fan_in = a.shape
        out = b.shape[1]
        return (x.dtype in self._lora and x.dtype == y.dtype == a.dtype == b.dtype
                and x.device.type == "cpu" and x.stride(1) == 1 and y.stride(1) == 1
                and a.stride() == (r * fan_in, 1, r) and b.stride() == (r * out, 1, out)
                and x.shape[1] == fan_in and y.shape[1] == out and b.shape == (s, out, r))

    def lora_sgmv(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  meta: torch.Tensor, n_groups: int, chunks: torch.Tensor,
                  scratch: torch.Tensor) -> None:
        """y[rows] += B_s @ (A_s @ x[rows]) per segment, in place (see the C++ source).

        meta: int64 [n_rows + n_groups + 1 + n_groups] = rows grouped by segment, segment
        offsets into them, each segment's slot. chunks: int64 [n, 4] from `lora_chunks`.
        scratch: float32 with at least n_rows * (in + R) elements."""
        n_rows = meta.shape[0] - 2 * n_groups - 1
        _, rank, fan_in = a.shape
        out = b.shape[1]
        assert scratch.dtype == torch.float32 and scratch.numel() >= n_rows * (fan_in + rank)
        rows = meta.data_ptr()
        seg = rows + 8 * n_rows
        xf = scratch.data_ptr()
        self._lora[x.dtype](x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                            a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0),
                            rows, seg, seg + 8 * (n_groups + 1), n_groups, rank, fan_in, out,
                            chunks.data_ptr(), chunks.shape[0], xf, xf + 4 * n_rows * fan_in,
                            torch.get_num_threads())


    def supports_decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """q [B, Hq, D] with contiguous heads; kv_cache [2, Hk, n_blocks, bs, D] contiguous, of
        q's dtype, or int8 [2, Hk, n_blocks, bytes] (layers/kv_int8.py)."""
        hk, (_, hq, d) = kv_cache.shape[1], q.shape
        return (q.dtype in self._decode and cache_matches(kv_cache, q.dtype, d)
                and q.device.type == "cpu" and kv_cache.is_contiguous() and q.stride(2) == 1
                and q.stride(1) == d and hq % hk == 0 and hq // hk * d <= MAX_DECODE_GROUP_DIM)

    def paged_decode(self, q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor,
                     bounds: torch.Tensor, max_keys: int, scale: float,
                     row_seq: torch.Tensor | None = None) -> torch.Tensor:
        """Attention read straight from the paged cache, each query row on its own (see the
        C++ source): decode rows, and prefill rows once their keys are in the cache.

        tables [S, max_blocks] int64 block ids per sequence; row_seq [B] int64 each row's
        sequence (None: row b is sequence b); bounds [B, 2] int64 the key positions
        [start, end) of each row, max_keys >= every end - start. Returns out [B, Hq, D]."""
        b, hq, d = q.shape
        hk = kv_cache.shape[1]
        head, bs = cache_head(kv_cache, d)
        assert tables.dtype == bounds.dtype == torch.int64 and tables.is_contiguous()
        assert row_seq is None or (row_seq.dtype == torch.int64 and row_seq.is_contiguous())
        threads = torch.get_num_threads()
        out = torch.empty(b, hq, d, dtype=q.dtype)
        scratch = torch.empty(threads * (hq // hk) * max(max_keys, 1), dtype=torch.float32)
        fn = (self._decode8 if kv_cache.dtype == torch.int8 else self._decode)[q.dtype]
        k_ptr = kv_cache.data_ptr()
        fn(q.data_ptr(), q.stride(0), out.data_ptr(), k_ptr,
           k_ptr + hk * head * kv_cache.element_size(), head, bs, d, tables.data_ptr(),
           tables.stride(0), None if row_seq is None else row_seq.data_ptr(), bounds.data_ptr(),
           b, hq, hk, scale, scratch.data_ptr(), max(max_keys, 1), threads)
        return out


def cache_matches(kv_cache: torch.Tensor, dtype: torch.dtype, d: int) -> bool:
    """A layer's cache the kernels read with head dim d: [2, Hk, n_blocks, bs, D] of `dtype`,
    or the int8 layout [2, Hk, n_blocks, bytes] (D a multiple of 32, 16-key sub-blocks)."""
    if kv_cache.dtype == torch.int8:
        return (kv_cache.dim() == 4 and d % kv_int8.GROUP == 0
                and kv_cache.shape[3] % (18 * d) == 0)
    return kv_cache.dtype == dtype and kv_cache.dim() == 5 and kv_cache.shape[4] == d


def cache_head(kv_cache: torch.Tensor, d: int) -> tuple[int, int]:
    """(elements per KV head of one half, block size) of a layer's cache."""
    if kv_cache.dtype == torch.int8:
        return kv_cache.shape[2] * kv_cache.shape[3], kv_int8.block_size_of(kv_cache, d)
    _, _, n_blocks, bs, _ = kv_cache.shape
    return n_blocks * bs * d, bs


def lora_chunks(shard_rows: list[int], rank: int, width: int = 64) -> torch.Tensor:
    """The expand kernel's column blocks: (first column, width, r_lo, r_hi) per block of at most
    `width` columns inside one shard; shard j of a fused linear owns ranks j*rb..(j+1)*rb with
    rb = rank / len(shard_rows) (its B is block-diagonal)."""
    rb = rank // len(shard_rows)
    table, start = [], 0
    for j, rows in enumerate(shard_rows):
        table += [(c, min(width, start + rows - c), j * rb, (j + 1) * rb)
                  for c in range(start, start + rows, width)]
        start += rows
    return torch.tensor(table, dtype=torch.int64)


def _cache_root() -> Path:
    if env := os.environ.get("TOKENMILL_KERNEL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenmill" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[:1]
    h = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        h.update(source.read_bytes())
    for part in (compiler, *version, *flags, _cpu_flags(), str(ABI_VERSION)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def build(cache_root: Path | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile the kernels (or find them cached) and return the library's path. Tests pass
    other `flags` to build the portable (no AVX-512) variants."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    folder = (cache_root or _cache_root()) / _build_key(compiler, flags)
    lib = folder / "libtokenmill_cpu.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent builders never see a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, "-o", tmp, *map(str, SOURCES)],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_lock = threading.Lock()
_loaded: list[CpuKernels | None] = []  # [] until the first call


def cpu_kernels() -> CpuKernels | None:
    """The kernels, built and loaded once per process (`TOKENMILL_CPU_KERNELS` is read then);
    None when off or unavailable. Called for every LoRA linear, so the common case is a read."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            off = os.environ.get("TOKENMILL_CPU_KERNELS", "1") == "0"
            _loaded.append(None if off else _load())
        return _loaded[0]


def _load() -> CpuKernels | None:
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
        if lib.tm_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path}: ABI {lib.tm_abi_version()}, expected {ABI_VERSION}")
        return CpuKernels(lib, path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernels unavailable, using the torch paths: %s", e)
        return None
