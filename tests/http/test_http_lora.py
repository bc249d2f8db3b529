"""LoRA over HTTP: `--lora-adapters`, TGI's `parameters.adapter_id`, OpenAI's `model` naming an
adapter, `/v1/models` and `/info` listing adapters, 422/404 for unknown ones."""

from __future__ import annotations

import httpx2 as httpx
import pytest
from server_proc import ServerProcess

from lora_files import write_adapter
from tokenmill.protocol import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    from tokenmill.llm import LLM

    adapter = write_adapter(tmp_path_factory.mktemp("lora") / "tiny")
    offline = LLM(dtype="float32", max_batch_total_tokens=2048,
                  lora_adapters=[f"tiny={adapter}"])
    eng = offline.engine
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    expected = {}
    for a in (None, "tiny"):
        eng.add_request(PROMPT, params, request_id=str(a), adapter_id=a)
    while eng.has_unfinished:
        for out in eng.step():
            if out.finished:
                expected[None if out.request_id == "None" else "tiny"] = out.text
    del offline
    s = ServerProcess("--dtype", "float32", "--max-batch-total-tokens", "2048", "--lora-adapters", f"tiny={adapter}")
    try:
        yield s.wait_ready(), expected
    finally:
        s.stop()


def test_adapter_routing(lora_setup) -> None:
    server, expected = lora_setup
    assert expected["tiny"] != expected[None]

    def gen(params: dict) -> httpx.Response:
        return httpx.post(f"{server.url}/generate", timeout=120,
                          json={"inputs": PROMPT, "parameters": {"max_new_tokens": 10, **params}})

    assert gen({}).json()["generated_text"] == expected[None]
    assert gen({"adapter_id": "tiny"}).json()["generated_text"] == expected["tiny"]
    for bad in ("nope", "../tiny", "/etc/passwd"):
        r = gen({"adapter_id": bad})
        assert r.status_code == 422 and "not loaded" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0})
    assert r.json()["model"] == "tiny" and r.json()["choices"][0]["text"] == expected["tiny"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "other", "prompt": PROMPT})
    assert r.status_code == 404
    models = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert models == ["HuggingFaceTB/SmolLM2-135M-Instruct", "tiny"]
    assert httpx.get(f"{server.url}/info").json()["adapters"] == ["tiny"]
