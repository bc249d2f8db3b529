"""LoRA at run time over HTTP: vLLM's load / unload routes behind --api-key, loading on first
use under --lora-dynamic-dir, path safety, bad adapters as clean 4xx, hot-loading while 32
streams run, unloading an adapter in use only after its requests finish, and LRU swapping
with --max-active-adapters 2."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx
import pytest
from server_proc import ServerProcess

from lora_files import write_adapter

PROMPT = "The capital of France is"
KEY = {"Authorization": "Bearer k3y"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenmill.llm import LLM
    from tokenmill.protocol import SamplingParams

    root = tmp_path_factory.mktemp("adapters")
    good = {"a": write_adapter(root / "a", seed=1),
            "b": write_adapter(root / "b", seed=2, rank=8, targets=("q_proj", "o_proj",
                                                                     "down_proj")),
            "c": write_adapter(root / "c", seed=3, rank=2, targets=("v_proj", "up_proj"))}
    write_adapter(root / "dora", config={"use_dora": True})
    write_adapter(root / "rankbad", rank=8, tensor_rank=4)
    corrupt = write_adapter(root / "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = write_adapter(root / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    write_adapter(root.parent / f"{root.name}-outside")  # a sibling outside the root
    (root / "escape").symlink_to(root.parent / f"{root.name}-outside")

    offline = LLM(dtype="float32", max_batch_total_tokens=2048,
                  lora_adapters=[f"{n}={p}" for n, p in good.items()])
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    expected: dict[str | None, str] = {}
    for a in (None, *good):
        offline.engine.add_request(PROMPT, params, request_id=str(a), adapter_id=a)
    while offline.engine.has_unfinished:
        for out in offline.engine.step():
            if out.finished:
                expected[None if out.request_id == "None" else out.request_id] = out.text
    del offline
    s = ServerProcess("--dtype", "float32", "--lora-dynamic-dir", str(root), "--api-key", "k3y",
                      "--max-active-adapters", "2", "--max-batch-total-tokens", "8192",
                      "--max-concurrent-requests", "64", "--max-batch-size", "64")
    try:
        yield s.wait_ready(), root, expected
    finally:
        s.stop()


def post(server: ServerProcess, path: str, body: dict, headers: dict | None = KEY,
         ) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120)


def generate(server: ServerProcess, adapter: str | None, n: int = 10) -> httpx.Response:
    params = {"max_new_tokens": n}
    if adapter is not None:
        params["adapter_id"] = adapter
    return post(server, "/generate", {"inputs": PROMPT, "parameters": params})


def message(r: httpx.Response) -> str:
    err = r.json()["error"]  # TGI: a string; OpenAI-style (/v1): an object with a message
    return err if isinstance(err, str) else err["message"]


def models(server: ServerProcess) -> list[str]:
    r = httpx.get(f"{server.url}/v1/models", headers=KEY, timeout=10)
    return [m["id"] for m in r.json()["data"]][1:]


def test_load_route_auth_paths_and_bad_adapters(setup) -> None:
    server, root, expected = setup
    body = {"lora_name": "first", "lora_path": "a"}
    assert post(server, "/v1/load_lora_adapter", body, headers=None).status_code == 401
    bad = {
        "dora": "use_dora", "rankbad": "do not match", "corrupt": "corrupt",
        "pickled": "pickle", "../" + root.name + "-outside": "outside",
        str(root.parent / f"{root.name}-outside"): "outside", "escape": "outside",
        "missing": "does not exist",
    }
    bad["y" * 300] = "does not exist"  # longer than a file name may be: no 500
    for path, why in bad.items():
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert r.status_code == 400, (path, r.text)
        assert why in message(r), (path, r.json())
        assert str(root) not in r.text and "Errno" not in r.text, r.text  # no internals
    for placeholder in ("dummy", "tgi"):  # names that mean the base model in requests
        r = post(server, "/v1/load_lora_adapter", {"lora_name": placeholder, "lora_path": "a"})
        assert r.status_code == 400 and "base model" in message(r)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert r.status_code == 422
    r = post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == 200 and "first" in r.text
    assert post(server, "/v1/load_lora_adapter", body).status_code == 400  # already loaded
    assert generate(server, "first").json()["generated_text"] == expected["a"]
    assert generate(server, None).json()["generated_text"] == expected[None]
    assert "first" in models(server)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}).status_code == 404
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "first"})
    assert r.status_code == 200 and "first" not in models(server)


def test_dynamic_first_use(setup) -> None:
    server, root, expected = setup
    r = post(server, "/v1/completions", {"model": "b", "prompt": PROMPT, "max_tokens": 10,
                                         "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected["b"]
    assert "b" in models(server)
    odd = "not an adapter folder name"
    for name, status, why in (("dora", 422, "use_dora"), ("corrupt", 422, "corrupt"),
                              ("../" + root.name + "-outside", 422, odd),
                              ("escape", 422, "outside"), ("nothing-here", 422, "not loaded"),
                              ("z" * 300, 422, "longer than 255 bytes")):
        r = generate(server, name)
        assert r.status_code == status and why in message(r), (name, r.text)
        assert str(root) not in r.text, r.text  # the server's paths stay on the server
    # Other spellings of b's folder are refused, not loaded again under new names.
    for name in ("./b", "b/", "b//", "b/.", "././b", "b/../b", "/b"):
        r = post(server, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 422 and odd in message(r), (name, r.text)
    assert [m for m in models(server) if m.endswith("b")] == ["b"]
    assert generate(server, None).json()["generated_text"] == expected[None]


async def _stream(client: httpx.AsyncClient, url: str, adapter: str | None, n: int,
                  ) -> tuple[int, float]:
    """Stream one generation; (tokens received, when the final event came). Fails on an
    error event or a count that disagrees with the final details."""
    params: dict = {"max_new_tokens": n, "details": True}
    if adapter is not None:
        params["adapter_id"] = adapter
    tokens = 0
    async with client.stream("POST", f"{url}/generate_stream", headers=KEY,
                             json={"inputs": PROMPT, "parameters": params}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            ev = json.loads(line[5:])
            assert "error" not in ev, ev
            tokens += 1
            if ev.get("generated_text") is not None:
                assert ev["details"]["generated_tokens"] == tokens
                return tokens, time.monotonic()
    raise AssertionError("stream ended without a final event")


def test_hot_load_while_32_streams_run_and_unload_waits(setup) -> None:
    server, _, expected = setup

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            # Three adapters through two device slots; "a" is loaded on first use by eight
            # concurrent streams at once.
            adapters = [None, "b", "c", "a"]
            streams = [asyncio.create_task(_stream(client, server.url, adapters[i % 4], 16))
                       for i in range(32)]
            await asyncio.sleep(1.0)
            r = await client.post(f"{server.url}/v1/load_lora_adapter", headers=KEY,
                                  json={"lora_name": "hot", "lora_path": "a"})
            assert r.status_code == 200, r.text
            r = await client.post(f"{server.url}/generate", headers=KEY, json={
                "inputs": PROMPT, "parameters": {"max_new_tokens": 10, "adapter_id": "hot"}})
            assert r.json()["generated_text"] == expected["a"]
            # Unload "hot" while a long request uses it: it finishes first, then it is gone.
            long = asyncio.create_task(_stream(client, server.url, "hot", 40))
            await asyncio.sleep(1.0)
            r = await client.post(f"{server.url}/v1/unload_lora_adapter", headers=KEY,
                                  json={"lora_name": "hot"})
            unloaded_at = time.monotonic()
            assert r.status_code == 200, r.text
            n, ended_at = await long
            assert n > 0 and ended_at <= unloaded_at
            r = await client.post(f"{server.url}/generate", headers=KEY, json={
                "inputs": PROMPT, "parameters": {"max_new_tokens": 4, "adapter_id": "hot"}})
            assert r.status_code == 422
            results = await asyncio.gather(*streams)
            assert len(results) == 32

    asyncio.run(scenario())
    assert generate(server, None).json()["generated_text"] == expected[None]
