"""The offline, async and command-line APIs on the real default model."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import pytest

from tokenmill.protocol import FinishReason, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_chat_answer_and_eos(llm32) -> None:
    out = llm32.chat(QUESTION, SamplingParams(max_new_tokens=32, temperature=0.0))[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == FinishReason.EOS


def test_stop_string_spanning_tokens_is_removed(llm32) -> None:
    sp = SamplingParams(max_new_tokens=32, temperature=0.0, stop=["of Fr"])
    out = llm32.chat(QUESTION, sp)[0]
    assert out.text == "The capital "
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == "of Fr"
    kept = llm32.chat(QUESTION, SamplingParams(max_new_tokens=32, temperature=0.0,
                                               stop=["Paris"], include_stop_str_in_output=True))[0]
    assert kept.text == "The capital of France is Paris"
    eng = llm32.engine
    assert not eng.has_unfinished and eng.kv.num_free_blocks == eng.kv.num_blocks


def test_logprobs_and_top_alternatives(llm32) -> None:
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
    out = llm32.generate("The capital of France is", sp)[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy picks the most likely
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)
        assert math.isclose(lp.top[0][1], lp.logprob, abs_tol=1e-6)


def test_sampling_params_are_validated(llm32) -> None:
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0),
                dict(top_k=-3), dict(temperature=float("nan")), dict(seed=2**64)):
        with pytest.raises(ValueError):
            llm32.generate("hi", SamplingParams(**bad))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token ids"):
        llm32.generate([[1, 2, 10**9]])
    with pytest.raises(ValueError, match="at least one token"):
        llm32.generate("")
    assert not llm32.engine.has_unfinished


def test_async_stream_and_abort(llm32) -> None:
    from tokenmill.frontend.async_llm import AsyncLLM

    engine = AsyncLLM(llm32.engine)
    try:
        async def main() -> tuple[list[str], str, int]:
            deltas = []
            async for out in engine.generate("Once upon a time",
                                             SamplingParams(max_new_tokens=12, temperature=0.0,
                                                            ignore_eos=True)):
                deltas.append(out.delta)
                last = out
            # A consumer that walks away mid-stream aborts its request.
            gen = engine.generate("Tell me a long story", SamplingParams(max_new_tokens=500,
                                                                         ignore_eos=True))
            n = 0
            async for _ in gen:
                n += 1
                if n == 3:
                    break
            await gen.aclose()
            with pytest.raises(ValueError):
                async for _ in engine.generate("x", SamplingParams(top_p=2.0)):
                    pass
            return deltas, last.text, len(last.token_ids)

        deltas, text, ntok = asyncio.run(main())
        assert "".join(deltas) == text and ntok == 12
        import time

        deadline = time.time() + 10
        eng = llm32.engine
        while eng.has_unfinished and time.time() < deadline:
            time.sleep(0.05)
        assert not eng.has_unfinished  # the abandoned stream was aborted
        assert eng.kv.num_free_blocks == eng.kv.num_blocks
    finally:
        engine.shutdown()  # one thread drives an engine at a time
    offline = llm32.generate("Once upon a time", SamplingParams(
        max_new_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert offline.text == text


def test_cli_generate() -> None:
    r = subprocess.run([sys.executable, "-m", "tokenmill", "generate", "--dtype", "float32",
                        "--max-batch-total-tokens", "4096",
                        "What is the capital of France? Answer in one sentence."],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."


def test_cli_reports_bad_model_cleanly(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    r = subprocess.run([sys.executable, "-m", "tokenmill", "generate", "--model-id", str(bad),
                        "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "broken.gguf" in r.stderr and "Traceback" not in r.stderr
