"""The bad-input checklist (shared/notes/ecosystem.md §6, items 1-10, 16-20, 22, 24) against a
real server: each gets a clean 4xx (or the stated behaviour), and the server keeps serving."""

from __future__ import annotations

import json
import socket
import time

import httpx2 as httpx
import pytest

GOOD = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3}}


def still_serving(url: str) -> None:
    r = httpx.post(f"{url}/generate", json=GOOD, timeout=60)
    assert r.status_code == 200 and r.json()["generated_text"]


def post_raw(url: str, path: str, body: bytes, headers: dict[str, str] | None = None
             ) -> httpx.Response:
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{url}{path}", content=body, headers=h, timeout=60)


def raw_http(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return data


def check_error(r: httpx.Response, status: int, text: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    msg = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert "error_type" in body
    assert text in msg, msg


# 1. bodies over the payload limit, however sent
def test_payload_limit(server) -> None:
    big = json.dumps({"inputs": "x" * 2_100_000}).encode()
    check_error(post_raw(server.url, "/generate", big), 413)

    def chunks():
        for _ in range(30):
            yield b" " * 100_000
        yield b'{"inputs": "hi"}'

    r = httpx.post(f"{server.url}/generate", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=60)
    check_error(r, 413)
    # A false Content-Length over the limit is refused at once, before any body arrives.
    head = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000000\r\n\r\n{")
    t0 = time.perf_counter()
    assert b" 413 " in raw_http(server.port, head, timeout=5).split(b"\r\n")[0]
    assert time.perf_counter() - t0 < 4
    still_serving(server.url)


# 2. malformed JSON, wrong content type, invalid UTF-8, lone surrogates
@pytest.mark.parametrize("body", [b'{"inputs": ', b'{"inputs": "\xff\xfe"}',
                                  b'{"inputs": "\\ud800"}', b"[1, 2", b""])
def test_malformed_bodies(server, body: bytes) -> None:
    r = post_raw(server.url, "/generate", body)
    assert r.status_code in (400, 422), r.text
    still_serving(server.url)


def test_wrong_content_type(server) -> None:
    r = httpx.post(f"{server.url}/generate", content=json.dumps(GOOD),
                   headers={"content-type": "text/plain"}, timeout=30)
    check_error(r, 415)


# 3. deep nesting, NaN and Infinity literals
@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"inputs": "x", "parameters": {"temperature": NaN}}',
                                  b'{"inputs": "x", "parameters": {"top_p": Infinity}}',
                                  b'{"model": "tgi", "messages": [{"role": "user", '
                                  b'"content": "x"}], "temperature": -Infinity}'])
def test_nesting_and_non_finite(server, body: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/generate"
    r = post_raw(server.url, path, body)
    assert r.status_code in (400, 422), r.text
    still_serving(server.url)


# 4-9: validation, on both APIs
TGI_BAD = [
    ({"inputs": ""}, "`inputs` cannot be empty"),
    ({"inputs": "word " * 9000}, "must have less than"),
    ({"inputs": "x", "parameters": {"truncate": 0}}, "`truncate` must be strictly positive"),
    ({"inputs": "x", "parameters": {"truncate": 10**6}}, "`truncate` must be strictly positive"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "strictly positive"),
    ({"inputs": "x", "parameters": {"max_new_tokens": -5}}, "strictly positive"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 2**64}}, "max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 20000}}, "must be <="),
    ({"inputs": "x", "parameters": {"best_of": 1000, "do_sample": True}}, "`best_of` must be"),
    ({"inputs": "x", "parameters": {"top_n_tokens": 1000}}, "`top_n_tokens` must be"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "stop sequences"),
    ({"inputs": "x", "parameters": {"temperature": -1}}, "`temperature` must be strictly"),
    ({"inputs": "x", "parameters": {"top_p": 1.5}}, "`top_p` must be"),
    ({"inputs": "x", "parameters": {"top_k": -1}}, "`top_k` must be strictly positive"),
    ({"inputs": "x", "parameters": {"repetition_penalty": 0}}, "`repetition_penalty`"),
    ({"inputs": "x", "parameters": {"frequency_penalty": 3}}, "`frequency_penalty`"),
    ({"inputs": "x", "parameters": {"seed": 2**64}}, "seed"),
    ({"inputs": "x", "parameters": {"adapter_id": "../../etc/passwd"}}, "adapter"),
    ({"inputs": "x", "parameters": {"adapter_id": "no-such-adapter"}}, "adapter"),
]


@pytest.mark.parametrize(("body", "text"), TGI_BAD)
def test_tgi_validation(server, body: dict, text: str) -> None:
    check_error(httpx.post(f"{server.url}/generate", json=body, timeout=60), 422, text)


CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
OPENAI_BAD = [
    ("/v1/chat/completions", {**CHAT, "messages": []}, 422),
    ("/v1/chat/completions", {**CHAT, "n": 10**6}, 422),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 10**3}, 422),
    ("/v1/chat/completions", {**CHAT, "temperature": 5e9}, 422),
    ("/v1/chat/completions", {**CHAT, "seed": -1}, 422),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"999999999": 5}}, 422),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(5000)}}, 422),
    ("/v1/chat/completions", {**CHAT, "model": "other-model"}, 404),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 422),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tokenize": True}}, 422),
    ("/v1/completions", {"model": "tgi", "prompt": [[1, 2, 10**9]], "max_tokens": 2}, 422),
    ("/v1/completions", {"model": "tgi", "prompt": [[-1, 2]], "max_tokens": 2}, 422),
    ("/v1/completions", {"model": "tgi", "prompt": ["a"] * 50, "max_tokens": 2}, 422),
    ("/v1/completions", {"model": "tgi", "prompt": "x", "max_tokens": 0}, 422),
    ("/v1/completions", {"model": "tgi", "prompt": "x", "best_of": 10**6}, 422),
]


@pytest.mark.parametrize(("path", "body", "status"), OPENAI_BAD)
def test_openai_validation(server, path: str, body: dict, status: int) -> None:
    check_error(httpx.post(f"{server.url}{path}", json=body, timeout=60), status)


def test_whitespace_and_special_token_text_are_served(server) -> None:
    # 4: whitespace-only input is a valid prompt; 18: special-token text in user content is
    # passed through as the special token (policy shared with TGI, vLLM and transformers).
    r = httpx.post(f"{server.url}/generate", json={"inputs": "   \n ",
                                                   "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        **CHAT, "messages": [{"role": "user", "content": "hi<|im_end|>\n<|im_start|>system"}]})
    assert r.status_code == 200
    still_serving(server.url)


# 19. client disconnects free their KV blocks
def kv_state(url: str) -> tuple[float, float]:
    """(KV slots held by running sequences, running sequences) from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("tgi_batch_current_max_tokens ", "tgi_batch_current_size ")):
            name, v = line.split()
            values[name] = float(v)
    return values["tgi_batch_current_max_tokens"], values["tgi_batch_current_size"]


def wait_idle(url: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if kv_state(url) == (0.0, 0.0):
            return
        time.sleep(0.2)
    raise AssertionError(f"blocks not freed: {kv_state(url)}")


def test_disconnects_free_blocks(server) -> None:
    wait_idle(server.url)
    long_stream = {"model": "tgi", "prompt": "Tell me a story", "max_tokens": 2000,
                   "ignore_eos": True, "stream": True}
    # mid-stream
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_stream,
                      timeout=60) as r:
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data:")
            if n >= 3:
                break
    wait_idle(server.url)
    # during prefill (a long prompt) and while queued behind it: close right after sending
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"inputs": "word " * 3000, "parameters": {"max_new_tokens": 500}})
        s.sendall((f"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: "
                   f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        time.sleep(0.3)
        s.close()
    wait_idle(server.url, timeout=60)
    # a request that is not streamed: its generation stops when its client goes (TGI drops
    # it too), it does not run to the end holding a slot and KV blocks
    long_json = {"model": "tgi", "max_tokens": 2000, "ignore_eos": True}
    for path, body in (("/v1/completions", {**long_json, "prompt": "Tell me a story"}),
                       ("/v1/chat/completions", {**long_json, "messages": [
                           {"role": "user", "content": "Tell me a story"}]})):
        s = socket.create_connection(("127.0.0.1", server.port))
        data = json.dumps(body)
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n{data}").encode())
        deadline = time.time() + 30
        while kv_state(server.url)[1] == 0 and time.time() < deadline:
            time.sleep(0.1)  # until it runs
        assert kv_state(server.url)[1] == 1, path
        s.close()
        wait_idle(server.url, timeout=10)  # 2,000 tokens would take far longer
    still_serving(server.url)


# 22. API keys
def test_api_key(keyed_server) -> None:
    url = keyed_server.url
    assert httpx.post(f"{url}/generate", json=GOOD).status_code == 401
    bad = {"authorization": "Bearer wrong"}
    assert httpx.post(f"{url}/generate", json=GOOD, headers=bad).status_code == 401
    ok = {"authorization": "Bearer s3cret"}
    assert httpx.post(f"{url}/generate", json=GOOD, headers=ok, timeout=60).status_code == 200
    assert httpx.post(f"{url}/generate", json=GOOD, headers={"authorization": "bearer s3cret"},
                      timeout=60).status_code == 200
    for path in ("/info", "/v1/models", "/openapi.json", "/docs", "/tokenize"):
        method = httpx.post if path == "/tokenize" else httpx.get
        kw = {"json": GOOD} if path == "/tokenize" else {}
        assert method(f"{url}{path}", **kw).status_code == 401, path
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    # Host-header and path tricks do not open a protected route.
    for host in ("x/health", "x?/health", "/health"):
        raw = (f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(json.dumps(GOOD))}\r\n\r\n{json.dumps(GOOD)}").encode()
        status = raw_http(keyed_server.port, raw, timeout=5).split(b"\r\n")[0]
        assert b" 401 " in status or b" 400 " in status, status
    for path in ("/health/../generate", "//generate", "/generate?x=/health", "/health%2f..%2fgenerate"):
        r = httpx.post(f"{url}{path}", json=GOOD)
        assert r.status_code in (401, 404), (path, r.status_code)


# 20. past max_concurrent_requests is in test_http_clients.py (64 streams + one more).


def test_long_texts_tokenize_off_the_event_loop(server) -> None:
    """A ~1.9 MB prompt takes the tokenizer seconds; meanwhile the server keeps answering
    (tokenizing on the event loop stalled every request, /health included)."""
    import threading

    done: dict[str, object] = {}

    def big(path: str, body: dict) -> None:
        done[path] = httpx.post(f"{server.url}{path}", json=body, timeout=120).status_code

    text = " a" * 950_000
    jobs = [threading.Thread(target=big, args=("/generate", {"inputs": text})),
            threading.Thread(target=big, args=("/tokenize", {"inputs": text}))]
    for j in jobs:
        j.start()
    time.sleep(0.5)  # both bodies sent and being tokenized
    t0 = time.perf_counter()
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    health_s = time.perf_counter() - t0
    busy = len(done) < 2  # the big requests were still running when /health answered
    for j in jobs:
        j.join()
    assert done == {"/generate": 422, "/tokenize": 200}
    if busy:
        assert health_s < 1.0, health_s
    still_serving(server.url)
