"""The runner's side of constrained decoding: this step's grammar masks are filled on a
worker thread while the model runs, then added to the logits as a 0 / -inf bias.

Only constrained rows are touched; a step without any does no work at all (the runner never
calls in). On CPU the bitmask → bias conversion also runs on the worker; on a GPU the bitmask
(filled in host memory, as llguidance does) is copied over and converted there.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tokenmill.guided.backend import GrammarBackend, GrammarMatcher

__all__ = ["GrammarMasker", "apply_bias_", "bitmask_to_bias"]

_NEG_INF_BITS = -8388608  # 0xFF800000 as an int32: the bit pattern of float32 -inf


def bitmask_to_bias(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """``[n, W]`` int32 bitmask → ``[n, width]`` float32 bias: 0 where allowed, -inf elsewhere.

    Branch-free: ``(bit - 1) & 0xFF800000`` is 0 (+0.0) for a set bit and the bits of -inf
    for a clear one. Adding the bias is ~10x cheaper on CPU than ``masked_fill_`` with a bool
    mask (measured, 32 x 49,152 logits, one thread: 0.33 ms to build + 0.14 ms to add, versus
    1.2-5.8 ms for ``masked_fill_``, which branches per element).
    """
    n, words = bitmask.shape
    if width > words * 32:
        raise ValueError(f"a bitmask of {words} words covers {words * 32} tokens, not {width}")
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = torch.bitwise_right_shift(bitmask.unsqueeze(-1), shifts)  # arithmetic: fine, & 1
    bits.bitwise_and_(1).sub_(1).bitwise_and_(_NEG_INF_BITS)
    return bits.view(n, words * 32)[:, :width].view(torch.float32)


def apply_bias_(logits: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor | None) -> None:
    """``logits[rows] += bias`` in place (all rows when ``rows`` is None); float32 logits."""
    if rows is None:
        logits.add_(bias)
    else:
        logits.index_add_(0, rows, bias)


class GrammarMasker:
    """One runner's mask worker: a single thread and a reused host bitmask buffer."""

    def __init__(self, backend: GrammarBackend, width: int, device: torch.device) -> None:
        self.backend = backend
        self.width = width  # the logits' width (the model's vocab_size)
        self.device = device
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-grammar")
        self._buf: torch.Tensor | None = None

    def start(self, matchers: Sequence[GrammarMatcher]) -> Future[torch.Tensor]:
        """Begin computing the masks of ``matchers`` (returns at once). The matchers must not
        change until ``bias`` returns."""
        words = self.backend.bitmask_words
        n = len(matchers)
        if self._buf is None or self._buf.shape[0] < n:
            pin = self.device.type == "cuda"
            self._buf = torch.empty((max(n, 8), words), dtype=torch.int32, pin_memory=pin)
        return self._pool.submit(self._fill, list(matchers), self._buf[:n])

    def _fill(self, matchers: list[GrammarMatcher], buf: torch.Tensor) -> torch.Tensor:
        self.backend.fill_bitmask(matchers, buf)
        if self.device.type == "cpu":
            return bitmask_to_bias(buf, self.width)
        return buf

    def bias(self, job: Future[torch.Tensor]) -> torch.Tensor:
        """Wait for ``job`` and return its ``[n, width]`` bias on the runner's device."""
        out = job.result()
        if self.device.type != "cpu":
            # A blocking copy: the host buffer is refilled by the next step.
            out = bitmask_to_bias(out.to(self.device), self.width)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
