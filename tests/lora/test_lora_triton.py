"""Triton LoRA kernels against a naive per-token loop (Triton's CPU interpreter) and against the
torch path on CUDA. triton is not a project dependency: without it these tests skip.

The interpreter must be chosen before triton is imported (its own library functions are jitted
at import), so the interpreted tests run in a child pytest with TRITON_INTERPRET=1 started by
`test_interpreted_kernels`; this process, and the other test modules, never see the variable."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

from pytest_child import run_ptx_child, run_pytest_child

try:  # src layout: make `import tokenmill` work without an install
    import tokenmill  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from tokenmill.lora import triton_lora
from tokenmill.lora.punica import LoraPlan, lora_add_, make_plan, use_triton

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PTX_CHILD = os.environ.get("TOKENMILL_PTX_CHILD") == "1"
in_ptx_child = pytest.mark.skipif(not PTX_CHILD,
                                  reason="runs in test_ptx_compile_in_a_child's child")
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in test_interpreted_kernels' child")


@pytest.mark.skipif(INTERPRET, reason="this is the child")
def test_interpreted_kernels() -> None:
    run_pytest_child(__file__, ["-m", "not gpu", "-k",
                                "not test_interpreted_kernels and not compile"],
                     {"TRITON_INTERPRET": "1"})


def _case(gen: torch.Generator, slots: list[int], n_slots: int, rank: int, d_in: int,
          d_out: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # LoRA-sized weights (std 0.1); scales are folded into B as the serving path does.
    a = (0.1 * torch.randn(n_slots, rank, d_in, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(n_slots, d_out, rank, generator=gen)).to(dtype)
    x = torch.randn(len(slots), d_in, generator=gen).to(dtype)
    y = torch.randn(len(slots), d_out, generator=gen).to(dtype)
    return x, y, a, b


def _naive(y: torch.Tensor, x: torch.Tensor, slots: list[int], a: torch.Tensor,
           b: torch.Tensor) -> torch.Tensor:
    out = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            out[t] += b[s].double() @ (a[s].double() @ x[t].double())
    return out


SLOTS = {
    "mixed": [(-1, 0, 2, 2, 1)[i % 5] for i in range(23)],
    "one-slot-all": [1] * 9,
    "one-slot-some": [1 if i % 3 else -1 for i in range(20)],
    # ragged segments of 1, 17 (crosses a 16-token block) and 33 tokens, interleaved
    "ragged": random.Random(0).sample([0] + [2] * 17 + [3] * 33 + [-1] * 5, 56),
    "decode": [3, -1, 0, 2],
}


def _plan(slots: list[int]) -> LoraPlan:
    plan = make_plan(slots, torch.device("cpu"), triton=True)
    assert plan is not None and plan.blocks is not None
    return plan


@interpreted
@pytest.mark.parametrize("case", sorted(SLOTS))
@pytest.mark.parametrize("rank", [4, 48, 64, 80])
def test_kernels_match_naive_fp32(case: str, rank: int) -> None:
    slots = SLOTS[case]
    gen = torch.Generator().manual_seed(rank)
    # in/out sizes that are not multiples of BLOCK_K / BLOCK_N
    x, y, a, b = _case(gen, slots, 4, rank, 70, 45, torch.float32)
    want = _naive(y, x, slots, a, b)
    got = triton_lora.lora_add_triton_(y, x, _plan(slots), a, b)
    assert got is y
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["mixed", "ragged"])
def test_kernels_half_precision(dtype: torch.dtype, case: str) -> None:
    slots = SLOTS[case]
    gen = torch.Generator().manual_seed(7)
    x, y, a, b = _case(gen, slots, 4, 16, 130, 67, dtype)
    want = _naive(y, x, slots, a, b)
    triton_lora.lora_add_triton_(y, x, _plan(slots), a, b)
    assert y.dtype == dtype
    # fp32 accumulation, h rounded once to the weights' dtype, y rounded once when stored
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)


@interpreted
@pytest.mark.parametrize("split_k", [2, 3, 5])  # 130 = 64 + 64 + 2: 5 leaves two splits empty
def test_split_k(split_k: int) -> None:
    slots = SLOTS["mixed"]
    gen = torch.Generator().manual_seed(split_k)
    x, y, a, b = _case(gen, slots, 4, 16, 130, 24, torch.float32)
    want = _naive(y, x, slots, a, b)
    triton_lora.lora_add_triton_(y, x, _plan(slots), a, b, split_k=split_k)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


def test_split_k_heuristic() -> None:
    assert triton_lora._split_k(4096, 1) == triton_lora.MAX_SPLIT_K  # decode, one adapter
    assert triton_lora._split_k(4096, 200) == 1  # prefill: enough programs already
    assert triton_lora._split_k(300, 1) == 1  # too little to split


@interpreted
def test_strided_inputs_and_untouched_rows() -> None:
    slots = SLOTS["mixed"]
    gen = torch.Generator().manual_seed(3)
    x, y, a, b = _case(gen, slots, 4, 8, 40, 24, torch.float32)
    wide = torch.randn(len(slots), 100, generator=gen)
    y_view = wide[:, 10:34]  # a column slice of a wider output, as a packed linear might give
    y_view.copy_(y)
    before = wide.clone()
    triton_lora.lora_add_triton_(y_view, x.t().contiguous().t(), _plan(slots), a, b)
    torch.testing.assert_close(y_view.double(), _naive(y, x, slots, a, b), atol=1e-5, rtol=1e-5)
    no_adapter = torch.tensor(slots) < 0
    assert torch.equal(wide[no_adapter], before[no_adapter])
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 34:], before[:, 34:])


def test_plan_blocks() -> None:
    plan = _plan(SLOTS["ragged"])
    assert plan.blocks is not None
    # slot 0: 1 token; slot 2: 17 (two blocks); slot 3: 33 (three blocks)
    assert plan.blocks.tolist() == [[0, 0, 1], [2, 1, 18], [2, 17, 18], [3, 18, 51],
                                    [3, 34, 51], [3, 50, 51]]
    cpu_plan = make_plan(SLOTS["ragged"], torch.device("cpu"))
    assert cpu_plan is not None and cpu_plan.blocks is None  # CPU: torch path, no table


def test_dispatch_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_triton(cuda) and not use_triton(cpu)  # triton imports here: no GPU needed
    monkeypatch.setenv("TOKENMILL_LORA_TRITON", "0")
    assert not use_triton(cuda)


def test_plan_without_blocks_is_refused() -> None:
    plan = make_plan([0, 1], torch.device("cpu"), triton=False)
    assert plan is not None
    with pytest.raises(ValueError):
        triton_lora.lora_add_triton_(torch.zeros(2, 3), torch.zeros(2, 4), plan,
                                     torch.zeros(2, 2, 4), torch.zeros(2, 3, 2))


@pytest.mark.skipif(INTERPRET or PTX_CHILD, reason="this is a child")
def test_ptx_compile_in_a_child() -> None:
    pytest.importorskip("triton")
    run_ptx_child(__file__, "compile_for_sm90")


@in_ptx_child
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_sm90(dtype: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU needed: ahead-of-time compilation to PTX catches what the interpreter does not
    # check (tl.dot shapes and dtypes, constexpr handling), and shows the tensor cores are used.
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    shrink, expand, interpreted = triton_lora._kernels()
    assert not interpreted
    ptr = {"x_ptr": dtype, "a_ptr": dtype, "b_ptr": dtype, "y_ptr": dtype, "h_ptr": "fp32",
           "rows_ptr": "i64", "blocks_ptr": "i32"}
    consts = {"BLOCK_T": 16, "BLOCK_R": 64, "BLOCK_K": 64, "BLOCK_N": 64, "UPCAST": False,
              "PRECISION": "tf32" if dtype == "bf16" else "ieee"}
    for kernel in (shrink, expand):
        sig = {n: f"*{ptr[n]}" if n in ptr else "constexpr" if n in consts else "i32"
               for n in kernel.arg_names}
        src = ASTSource(kernel, sig, constexprs={n: consts[n] for n in sig if n in consts})
        ptx = triton_compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert ("mma" in ptx) == (dtype == "bf16")  # fp32 with "ieee": exact FMA, no TF32


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_tokens", [1, 7, 300])
def test_cuda_kernels_match_torch_path(dtype: torch.dtype, n_tokens: int) -> None:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(n_tokens)
    slots = torch.randint(-1, 6, (n_tokens,), generator=gen).tolist()
    slots[0] = 5
    x, y, a, b = (t.to(dev) for t in _case(gen, slots, 6, 48, 2048, 1000, dtype))
    plan, torch_plan = make_plan(slots, dev), make_plan(slots, dev, triton=False)
    assert plan is not None and plan.blocks is not None and torch_plan is not None
    got, want = lora_add_(y.clone(), x, plan, a, b), lora_add_(y.clone(), x, torch_plan, a, b)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
