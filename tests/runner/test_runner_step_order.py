"""`ModelRunner.execute` builds the step's sampling tensors before it runs the model: on a GPU
their host-to-device copies wait for the stream, so built after the forward was queued they
made the host wait for the whole forward first. Checked by the order of the calls."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill.protocol import SamplingParams


@pytest.mark.slow
def test_sampling_tensors_are_built_before_the_forward() -> None:
    from tokenmill.llm import LLM

    llm = LLM(max_batch_total_tokens=2048)
    runner = llm.engine.core.runner
    calls: list[str] = []
    prepare, forward = runner.sampler.prepare, runner.model.forward

    def spy_prepare(*args: Any, **kw: Any) -> Any:
        calls.append("prepare")
        return prepare(*args, **kw)

    def spy_forward(*args: Any, **kw: Any) -> Any:
        calls.append("forward")
        return forward(*args, **kw)

    runner.sampler.prepare = spy_prepare  # type: ignore[method-assign]
    runner.model.forward = spy_forward  # type: ignore[method-assign]
    out = llm.generate(["The capital of France is"],
                       SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 3
    assert calls == ["prepare", "forward"] * 3  # a prefill step, then two decode steps
