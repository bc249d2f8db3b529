"""--quantize int4 on the default model (Q4_1 GGUF): greedy output through the packed int4/int8
kernels equals the same model run on its dequantized weights, and stays close to the
unquantized model."""

from __future__ import annotations

import pytest

from tokenmill.layers import linear as linear_mod
from tokenmill.protocol import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def test_int4_greedy_equals_dequantized_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.llm import LLM

    # float32 for an exact comparison (aten's int4 kernel is fast only with bfloat16).
    llm = LLM(dtype="float32", device="cpu", quantize="int4", max_batch_total_tokens=4096)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    # One request at a time: every decode step has 1 row, the packed kernels' regime.
    fast = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    monkeypatch.setattr(linear_mod, "QUANT_MAX_ROWS", -1)
    reference = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    assert fast == reference
    assert all(len(t) == 16 for t in fast)
