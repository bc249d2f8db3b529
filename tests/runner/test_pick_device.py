"""`--device`: what `pick_device` makes of it. CUDA is faked (a CPU build of torch has none):
a CUDA device with an index must become the current device (Triton launches on the current
device's stream), an index past the machine's devices is a clear error, and asking for CUDA
without one is too."""

from __future__ import annotations

import pytest
import torch

from tokenmill.runner import loading


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> list[torch.device]:
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    return current


def test_cpu_and_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    current = fake_cuda(monkeypatch, 0)
    assert loading.pick_device("auto") == torch.device("cpu")
    assert loading.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        loading.pick_device("cuda")
    assert current == []


def test_an_indexed_cuda_device_becomes_current(monkeypatch: pytest.MonkeyPatch) -> None:
    current = fake_cuda(monkeypatch, 2)
    assert loading.pick_device("cuda:1") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert loading.pick_device("cuda") == torch.device("cuda")  # the current one: left as is
    assert loading.pick_device("auto") == torch.device("cuda")
    assert current == [torch.device("cuda", 1)]


def test_an_index_past_the_devices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    current = fake_cuda(monkeypatch, 2)
    with pytest.raises(ValueError, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        loading.pick_device("cuda:2")
    assert current == []
