"""Batched mixed-adapter LoRA product against a naive per-token loop."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

try:  # src layout: make `import tokenmill` work without an install
    import tokenmill  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from tokenmill.lora.punica import lora_delta, lora_delta_bgmv, lora_delta_sgmv, stack_adapters

FNS = [lora_delta, lora_delta_bgmv, lora_delta_sgmv]


def _adapters(gen: torch.Generator, ranks: list[int], d_in: int, d_out: int,
              ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    # LoRA-sized values (std 0.1) keep fp32 rounding well under the 1e-5 tolerance.
    return [(0.1 * torch.randn(r, d_in, generator=gen), 0.1 * torch.randn(d_out, r, generator=gen),
             0.5 + i) for i, r in enumerate(ranks)]


def _naive(x: torch.Tensor, slots: torch.Tensor,
           adapters: list[tuple[torch.Tensor, torch.Tensor, float]], d_out: int) -> torch.Tensor:
    out = torch.zeros(x.shape[0], d_out)
    for t in range(x.shape[0]):
        s = int(slots[t])
        if s >= 0:
            a, b, scale = adapters[s]
            out[t] = scale * (b @ (a @ x[t]))
    return out


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("n_tokens", [1, 3, 8, 37, 64])
def test_matches_naive(fn: Callable, n_tokens: int) -> None:
    gen = torch.Generator().manual_seed(n_tokens)
    d_in, d_out, ranks = 48, 40, [2, 16, 8, 5, 16]
    adapters = _adapters(gen, ranks, d_in, d_out)
    a_stack, b_stack, scales = stack_adapters(adapters, r_max=16)
    assert a_stack.shape == (5, 16, d_in) and b_stack.shape == (5, d_out, 16)
    x = torch.randn(n_tokens, d_in, generator=gen)
    slots = torch.randint(-1, len(ranks), (n_tokens,), generator=gen)
    slots[0] = -1
    got = fn(x, slots, a_stack, b_stack, scales)
    assert got.shape == (n_tokens, d_out)
    torch.testing.assert_close(got, _naive(x, slots, adapters, d_out), atol=1e-5, rtol=1e-5)
    assert torch.all(got[slots < 0] == 0)


@pytest.mark.parametrize("fn", FNS)
def test_edge_cases(fn: Callable) -> None:
    gen = torch.Generator().manual_seed(1)
    adapters = _adapters(gen, [4, 4, 4], 16, 24)
    a_stack, b_stack, scales = stack_adapters(adapters, r_max=8)
    x = torch.randn(10, 16, generator=gen)
    none = torch.full((10,), -1, dtype=torch.long)
    assert torch.all(fn(x, none, a_stack, b_stack, scales) == 0)
    one = torch.full((10,), 2, dtype=torch.long)  # all tokens on one slot
    torch.testing.assert_close(fn(x, one, a_stack, b_stack, scales),
                               _naive(x, one, adapters, 24), atol=1e-5, rtol=1e-5)


def test_empty_and_bad_inputs() -> None:
    a_stack, b_stack, scales = stack_adapters([(torch.ones(2, 4), torch.ones(3, 2), 1.0)], 2)
    assert lora_delta(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                      a_stack, b_stack, scales).shape == (0, 3)
    with pytest.raises(ValueError):
        lora_delta(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), a_stack, b_stack, scales)
    with pytest.raises(ValueError):
        stack_adapters([(torch.ones(4, 4), torch.ones(3, 4), 1.0)], r_max=2)
    with pytest.raises(ValueError):
        stack_adapters([], r_max=2)


@pytest.mark.parametrize("path", ["torch", "cpu-kernel"])
@pytest.mark.parametrize("case", ["mixed", "one-slot-all", "one-slot-some", "none", "every-slot",
                                  "equal-groups", "grouped", "gapped"])
def test_plan_and_lora_add_match_naive(case: str, path: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.kernels.cpu import cpu_kernels
    from tokenmill.lora.punica import lora_add_, make_plan

    kernel = cpu_kernels()
    if path == "cpu-kernel" and kernel is None:
        pytest.skip("no C++ compiler: the native CPU kernels are not built")

    gen = torch.Generator().manual_seed(3)
    d_in, d_out, ranks = 32, 24, [4, 8, 8]
    adapters = _adapters(gen, ranks, d_in, d_out)
    a_stack, b_stack, scales = stack_adapters(adapters, r_max=8)
    b_scaled = b_stack * scales.view(-1, 1, 1)  # the serving path folds scales into B
    n = 13
    slots = {"mixed": [(-1, 0, 2, 2, 1)[i % 5] for i in range(n)],
             "one-slot-all": [1] * n, "one-slot-some": [1 if i % 3 else -1 for i in range(n)],
             "none": [-1] * n, "every-slot": [i % 3 for i in range(n)],
             "equal-groups": [*(i % 3 for i in range(n - 1)), -1],  # no padding
             "grouped": [-1] * 4 + [0] * 3 + [1] * 3 + [2] * 3,  # rows sorted by slot
             "gapped": [0 if i % 2 else 2 for i in range(n)]}[case]  # slots 0 and 2: gathered
    x = torch.randn(n, d_in, generator=gen)
    base = torch.randn(n, d_out, generator=gen)
    plan = make_plan(slots, torch.device("cpu"), cpu=path == "cpu-kernel")
    if path == "cpu-kernel":  # A and B stored transposed, the layout the kernel reads
        b_scaled = b_scaled.transpose(1, 2).contiguous().transpose(1, 2)
        a_stack = a_stack.transpose(1, 2).contiguous().transpose(1, 2)
        calls: list[int] = []
        assert kernel is not None
        monkeypatch.setattr(kernel, "lora_sgmv",
                            lambda *a, f=kernel.lora_sgmv: calls.append(1) or f(*a))
    if case == "none":
        assert plan is None
        return
    assert plan is not None and plan.identity == (case == "one-slot-all")
    assert (plan.pad is None) == (case in ("one-slot-all", "one-slot-some", "equal-groups",
                                           "grouped"))
    assert (plan.first_row is not None) == (case == "grouped")  # views, no gather
    assert (plan.slot_range is None) == (case == "gapped")
    y = base.clone()
    lora_add_(y, x, plan, a_stack, b_scaled)
    want = base + _naive(x, torch.tensor(slots), adapters, d_out)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert (plan.cpu_meta is not None) == (path == "cpu-kernel")
    if path == "cpu-kernel":
        assert calls == [1]
    with pytest.raises(ValueError, match="plan made for 13 tokens, batch has 2"):
        lora_add_(y[:2], x[:2], plan, a_stack, b_scaled)  # another step's plan: refused
