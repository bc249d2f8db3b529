"""Service routes: OpenAPI, /info, /tokenize, /invocations, /metrics names and counts, CORS,
structured logs."""

from __future__ import annotations

import json
import re

import httpx2 as httpx


def test_openapi_describes_real_request_schemas(server) -> None:
    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    for name in ("GenerateRequest", "GenerateParameters", "ChatCompletionRequest",
                 "CompletionRequest"):
        assert name in schemas, name
    assert "max_new_tokens" in schemas["GenerateParameters"]["properties"]
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/GenerateRequest")
    assert httpx.get(f"{server.url}/docs", timeout=30).status_code == 200


def test_info_tokenize_invocations(server) -> None:
    info = httpx.get(f"{server.url}/info", timeout=30).json()
    assert info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["max_total_tokens"] > info["max_input_tokens"] > 0
    assert info["max_concurrent_requests"] == 64
    toks = httpx.post(f"{server.url}/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["text"] for t in toks] == ["Hello", " world"]
    assert toks[1]["start"] == 5 and toks[1]["stop"] == 11
    inv = httpx.post(f"{server.url}/invocations", timeout=60,
                     json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert inv.status_code == 200 and isinstance(inv.json(), list)
    inv = httpx.post(f"{server.url}/invocations", timeout=60, json={
        "model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert inv.json()["object"] == "chat.completion"


def test_unknown_routes_and_methods_get_the_error_shape(server) -> None:
    """404 and 405 answer with the body every other error has (TGI's, or OpenAI's under
    /v1), not FastAPI's `{"detail": ...}`; a 405 still says which methods are allowed."""
    r = httpx.get(f"{server.url}/no-such-route", timeout=30)
    assert r.status_code == 404
    assert r.json() == {"error": "Not Found", "error_type": "not_found"}
    r = httpx.get(f"{server.url}/generate", timeout=30)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json() == {"error": "Method Not Allowed", "error_type": "method_not_allowed"}
    r = httpx.post(f"{server.url}/v1/nothing", json={}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_metrics_names_and_counts(server) -> None:
    before = httpx.get(f"{server.url}/metrics", timeout=30).text
    for _ in range(2):
        httpx.post(f"{server.url}/generate", timeout=60,
                   json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    httpx.post(f"{server.url}/generate", json={"inputs": ""}, timeout=30)  # a validation error
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("tgi_request_count", "tgi_request_success", "tgi_request_failure",
                 "tgi_request_duration", "tgi_request_queue_duration",
                 "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration",
                 "tgi_request_generated_tokens", "tgi_request_input_length",
                 "tgi_batch_current_size", "tgi_batch_current_max_tokens", "tgi_queue_size",
                 "tokenmill_kv_cache_usage_ratio", "tokenmill_prefix_cache_hit_ratio"):
        assert f"# TYPE {name} " in text, name
    assert metric(text, "tgi_request_count") - metric(before, "tgi_request_count") == 3
    assert metric(text, "tgi_request_success") - metric(before, "tgi_request_success") == 2
    assert metric(text, 'tgi_request_failure{err="validation"}') >= 1
    assert metric(text, "tgi_request_generated_tokens_count") >= 2


def test_cors_and_json_logs(keyed_server) -> None:
    url = keyed_server.url
    r = httpx.options(f"{url}/generate", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(f"{url}/generate", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    httpx.post(f"{url}/generate", timeout=60, headers={"authorization": "Bearer s3cret"},
               json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    lines = [json.loads(line) for line in keyed_server.output().splitlines()
             if line.startswith("{")]
    requests = [r for r in lines if r.get("route") == "/generate"]
    assert requests and {"id", "input_tokens", "generated_tokens", "queue_time",
                         "time_per_token", "finish_reason"} <= requests[-1].keys()
