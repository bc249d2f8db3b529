"""The default model against the oracle: transformers loading the same GGUF file, float32,
greedy, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenmill.protocol import FinishReason, SamplingParams  # noqa: E402

LONG = " ".join(
    f"Record {i}: the {c} {a} crossed {n} rivers before reaching the {p} at dawn."
    for i, (c, a, n, p) in enumerate(
        [("red", "fox", "three", "village"), ("grey", "wolf", "seven", "castle"),
         ("small", "owl", "two", "harbour"), ("old", "bear", "five", "monastery"),
         ("quick", "hare", "nine", "market"), ("brave", "lynx", "four", "lighthouse")] * 4))
PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Il était une fois, dans un petit village de Provence,",
    "人工智能是",
    "Москва — столица",
    "今日はいい天気ですね 🌞. Let's",
    '{"name": "Alice", "age": 30, "city": ',
    LONG + "\nSummary of the records:",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def oracle(default_gguf: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32)
    model.eval()
    return model


def reference_greedy(model, ids: list[int], eos: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def test_greedy_matches_transformers(llm32, oracle) -> None:
    tok = llm32.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Give me three tips for staying healthy."}],
        add_generation_prompt=True)
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.encode(chat, add_special_tokens=False)]
    assert any(len(p) > 300 for p in prompts), "one prompt must be several hundred tokens"
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    ours = llm32.generate(prompts, params)  # all nine in one continuous batch
    eos = llm32.engine.info.eos_token_ids[0]
    for ids, out in zip(prompts, ours):
        expected = reference_greedy(oracle, ids, eos)
        assert out.token_ids == expected, tok.decode(ids)[:60]
        if out.finish_reason == FinishReason.EOS:
            assert out.token_ids[-1] == eos
    assert ours[-1].finish_reason == FinishReason.EOS  # the chat answer ends itself


def test_prefill_logits_match_transformers(llm32, oracle) -> None:
    """Prompt logprobs of our paged prefill equal log_softmax of transformers' logits."""
    ids = llm32.tokenizer.encode(PROMPTS[1])
    out = llm32.generate([ids], SamplingParams(max_new_tokens=1, temperature=0.0,
                                               prompt_logprobs=0))[0]
    with torch.inference_mode():
        ref = torch.log_softmax(oracle(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    ours = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])  # type: ignore[union-attr]
    theirs = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
