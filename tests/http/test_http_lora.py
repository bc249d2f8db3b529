"""LoRA over HTTP: `--lora-adapters`, TGI's `parameters.adapter_id`, OpenAI's `model` naming an
adapter, `/v1/models` and `/info` listing adapters, 422/404 for unknown ones."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2 as httpx
import pytest
import torch
from safetensors.torch import save_file
from server_proc import ServerProcess

from tokenmill.protocol import SamplingParams

PROMPT = "The capital of France is"


def write_adapter(path: Path) -> Path:
    """A rank-4 adapter on q_proj and v_proj of SmolLM2 (hidden 576, 3 KV heads of 64)."""
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(30):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 576, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.3
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "smollm2"}))
    return path


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
    s = ServerProcess("--max-batch-total-tokens", "2048", "--lora-adapters", f"tiny={adapter}")
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
