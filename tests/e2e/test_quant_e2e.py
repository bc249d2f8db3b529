"""--quantize int4 / w4a8 on the default model (Q4_1 GGUF): greedy output through aten's packed
int4 kernel equals the same model run on its dequantized weights; w4a8 (int8 activations)
stays with it."""

from __future__ import annotations

import pytest

from tokenmill.layers.quant import Int4Weight
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
    monkeypatch.setattr(Int4Weight, "max_rows", -1)
    reference = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    assert fast == reference
    assert all(len(t) == 16 for t in fast)


def test_w4a8_greedy_follows_int4() -> None:
    from tokenmill.llm import LLM

    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    out = {}
    for method in ("int4", "w4a8"):
        llm = LLM(dtype="bfloat16", device="cpu", quantize=method, max_batch_total_tokens=4096)
        out[method] = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    # Rounding the activations moves the logits a little; on these prompts the greedy paths
    # stay together for 19 and 32 tokens (measured), so 16 must agree.
    assert out["w4a8"] == out["int4"]
