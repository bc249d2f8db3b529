"""`runner/weight_arena.py`: the native matmuls' weights copied into one mapping advised
MADV_HUGEPAGE (2 MB pages), the layers pointed at the copies: the same results; nothing moves
where transparent huge pages are off; loading does it unless TOKENMILL_HUGE_PAGES=0."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from tokenmill.kernels.cpu import cpu_kernels
from tokenmill.layers.dense import TiledWeight, prepare_cpu_weights
from tokenmill.layers.linear import Linear
from tokenmill.layers.quant import W4A8Weight
from tokenmill.runner import weight_arena
from tokenmill.runner.weight_arena import (
    HUGE_PAGE,
    huge_pages_available,
    native_weight_buffers,
    weights_in_huge_pages,
)

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="no native CPU kernels")


class Mixed(nn.Module):
    """A w4a8 layer, a dense bfloat16 one (tiles), a float16 one (neither: stays)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.w4a8 = Linear(64, 48).to(torch.bfloat16)
        self.dense = Linear(48, 32).to(torch.bfloat16)
        self.fp16 = Linear(32, 16).to(torch.float16)
        with torch.no_grad():
            for m in (self.w4a8, self.dense, self.fp16):
                m.weight.normal_()
        self.w4a8.quant = W4A8Weight.quantize(self.w4a8.weight, torch.bfloat16)[0]
        prepare_cpu_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dense(self.w4a8(x))
        return h, self.fp16(h[:, :32].half())


def _vma(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding addr."""
    fields: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            lo, hi = (int(v, 16) for v in head.split("-"))
            if fields is not None:
                break
            if lo <= addr < hi:
                fields = {"range": head}
        elif fields is not None and ":" in head:
            fields[head.rstrip(":")] = line.split(":", 1)[1].strip()
    assert fields is not None, hex(addr)
    return fields


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages")
def test_native_weights_move_into_one_huge_page_arena() -> None:
    model = Mixed()
    x = torch.randn(5, 64).to(torch.bfloat16)
    before = model(x)
    buffers = native_weight_buffers(model)
    assert len(buffers) == 3  # w4a8 packed + scales, the dense tiles; not the float16 weight
    old = [getattr(o, n) for o, n in buffers]
    fp16 = model.fp16.weight
    placed = weights_in_huge_pages(model)
    new = [getattr(o, n) for o, n in buffers]
    assert placed == sum(t.numel() * t.element_size() for t in old)
    for a, b in zip(old, new):
        assert b is not a and b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)
        assert b.data_ptr() % 64 == 0
    start = min(t.data_ptr() for t in new)
    assert start % HUGE_PAGE == 0  # the arena starts on a 2 MB boundary, packed from there
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in new)
    assert all(e <= s for (_, e), (s, _) in itertools.pairwise(spans))  # no overlaps
    assert spans[-1][1] - start < placed + 64 * len(new)
    vma = _vma(start)
    assert vma.get("THPeligible") == "1", vma  # advised: the kernel may back it with 2 MB
    assert "hg" in vma["VmFlags"].split()
    assert _vma(spans[-1][1] - 1)["range"] == vma["range"]  # one mapping
    assert model.fp16.weight is fp16
    after = model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert isinstance(model.dense.packed, TiledWeight)


def test_nothing_moves_without_transparent_huge_pages(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(weight_arena, "THP_ENABLED", never)
    assert not huge_pages_available()
    model = Mixed()
    old = [getattr(o, n) for o, n in native_weight_buffers(model)]
    assert weights_in_huge_pages(model) == 0
    assert all(getattr(o, n) is t for (o, n), t in zip(native_weight_buffers(model), old))
    monkeypatch.setattr(weight_arena, "THP_ENABLED", tmp_path / "missing")
    assert not huge_pages_available()
    assert weight_arena.place_in_arena([]) is None
    # multi-size THP: the 2 MB size off on its own turns the arena off; `inherit` or no
    # per-size file leaves it to the global setting
    madvise, size = tmp_path / "madvise", tmp_path / "2048kB"
    madvise.write_text("always [madvise] never\n")
    monkeypatch.setattr(weight_arena, "THP_ENABLED", madvise)
    monkeypatch.setattr(weight_arena, "THP_2MB_ENABLED", size)
    assert huge_pages_available()  # no per-size file
    size.write_text("always inherit madvise [never]\n")
    assert not huge_pages_available()
    assert weights_in_huge_pages(Mixed()) == 0
    size.write_text("always [inherit] madvise never\n")
    assert huge_pages_available()


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages")
@pytest.mark.parametrize("env", ["1", "0"])
def test_loading_places_the_default_models_weights(env: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.config import ModelConfig
    from tokenmill.runner import loading
    from tokenmill.runner.loading import load_model

    placed: list[int] = []

    def spy(model: nn.Module) -> int:
        placed.append(weights_in_huge_pages(model))
        return placed[-1]

    monkeypatch.setattr(loading, "weights_in_huge_pages", spy)
    monkeypatch.setenv("TOKENMILL_HUGE_PAGES", env)
    lm = load_model(ModelConfig())
    buffers = native_weight_buffers(lm.model)
    assert len(buffers) > 200  # 30 layers x 4 matmuls x (bytes, scales) and the int8 head
    vmas = [_vma(getattr(o, n).data_ptr()) for o, n in buffers]
    # VmFlags "hg": the mapping was advised MADV_HUGEPAGE. (Not THPeligible: where a smaller
    # mTHP size is `always`, any large anonymous mapping is eligible, advised or not.)
    advised = {"hg" in v["VmFlags"].split() for v in vmas}
    ranges = {v["range"] for v in vmas}
    if env == "1":
        assert len(placed) == 1 and placed[0] > 50 * 2**20
        assert advised == {True} and len(ranges) == 1
        assert {v.get("THPeligible") for v in vmas} == {"1"}
    else:
        # Nothing placed: the weights stay where loading made them. (Not "no buffer in an
        # advised mapping": numpy advises MADV_HUGEPAGE on its large arrays, and where glibc
        # served one from its heap the advice stays on that heap range after numpy frees it;
        # after the e2e tests, torch's allocations for these weights reused such ranges.)
        assert placed == []
        assert not (advised == {True} and len(ranges) == 1)
