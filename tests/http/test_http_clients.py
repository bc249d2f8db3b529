"""Real clients against a real server: the official openai client, huggingface_hub's
InferenceClient and TGI's text-generation client. Greedy HTTP results equal the offline API's."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import pytest

from tokenmill.protocol import SamplingParams

QUESTION = "What is the capital of France? Answer in one sentence."


def test_openai_chat_and_stream(server, offline) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    expected = offline.chat([{"role": "user", "content": QUESTION}],
                            SamplingParams(max_new_tokens=30, temperature=0.0))[0].text
    r = client.chat.completions.create(model="tgi", temperature=0, max_tokens=30,
                                       messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].message.content == expected == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="tgi", temperature=0, max_tokens=30,
                                            messages=[{"role": "user", "content": QUESTION}],
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == expected and usage is not None
    # n > 1 with logprobs
    r = client.chat.completions.create(model="tgi", n=2, max_tokens=8, seed=3, logprobs=True,
                                       top_logprobs=2,
                                       messages=[{"role": "user", "content": "Say hi"}])
    assert len(r.choices) == 2 and r.choices[0].logprobs is not None
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2


def test_openai_completions(server, offline) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    prompt = "def fibonacci(n):"
    expected = offline.generate(prompt, SamplingParams(max_new_tokens=24,
                                                       temperature=0.0))[0].text
    r = client.completions.create(model="tgi", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tgi", prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices)
    assert text == expected
    models = client.models.list()
    assert [m.id for m in models.data] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="max_new_tokens"):
        client.completions.create(model="tgi", prompt="x", max_tokens=10**7)


def test_huggingface_hub_inference_client(server, offline) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    prompt = "The capital of France is"
    expected = offline.generate(prompt, SamplingParams(max_new_tokens=12,
                                                       temperature=0.0))[0]
    # It posts to `/`, where TGI returns the full text by default for text-generation models.
    out = client.text_generation(prompt, max_new_tokens=12, details=True)
    assert out.generated_text == prompt + expected.text
    assert [t.id for t in out.details.tokens] == expected.token_ids
    streamed = list(client.text_generation(prompt, max_new_tokens=12, stream=True))
    assert "".join(streamed) == expected.text
    chat = client.chat_completion([{"role": "user", "content": QUESTION}], max_tokens=30,
                                  temperature=0)
    assert chat.choices[0].message.content == "The capital of France is Paris."


def test_text_generation_client(server, offline) -> None:
    from text_generation import Client

    client = Client(server.url, timeout=120)
    prompt = "Once upon a time"
    expected = offline.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0.0))[0]
    r = client.generate(prompt, max_new_tokens=10, decoder_input_details=True, top_n_tokens=2)
    assert r.generated_text == expected.text
    assert r.details.finish_reason.value == "length"
    assert len(r.details.prefill) == len(offline.tokenizer.encode(prompt))
    assert len(r.details.top_tokens[0]) == 2
    tokens = [resp.token.id for resp in client.generate_stream(prompt, max_new_tokens=10)]
    assert tokens == expected.token_ids
    sampled = client.generate(prompt, max_new_tokens=10, do_sample=True, best_of=2)
    assert len(sampled.details.best_of_sequences) == 1


def test_64_concurrent_streams_then_429(server, offline) -> None:
    prompts = [f"Item {i}: the {w} of the" for i, w in
               enumerate(["river", "stone", "light", "garden"] * 16)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    expected = [o.text for o in offline.generate(prompts, params)]

    async def one(client: httpx.AsyncClient, prompt: str) -> str:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 12}}
        text = ""
        async with client.stream("POST", f"{server.url}/generate_stream", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    import json

                    ev = json.loads(line[5:])
                    assert "error" not in ev, ev
                    if ev["generated_text"] is not None:
                        text = ev["generated_text"]
        return text

    async def overload(client: httpx.AsyncClient) -> tuple[int, float]:
        # 64 slow streams hold every slot; one more must be refused at once.
        body = {"model": "tgi", "prompt": "Tell me a story", "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        streams = [client.stream("POST", f"{server.url}/v1/completions", json=body)
                   for _ in range(64)]
        opened = [await s.__aenter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            import time

            t0 = time.perf_counter()
            r = await client.post(f"{server.url}/generate",
                                  json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
            return r.status_code, time.perf_counter() - t0
        finally:
            for s in streams:
                await s.__aexit__(None, None, None)

    async def main() -> tuple[list[str], tuple[int, float]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            texts = await asyncio.gather(*(one(client, p) for p in prompts))
            return texts, await overload(client)

    texts, (status, elapsed) = asyncio.run(main())
    assert texts == expected
    assert status == 429 and elapsed < 1.0
