"""The bench's client, runner and CLI against a fake aiohttp server of each API shape."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import aiohttp
import pytest
from fake_server import FakeServer

from tokenmill.bench.client import ClientConfig, RequestRecord, send_request
from tokenmill.bench.runner import run_level
from tokenmill.bench.workload import LengthDist, RequestSpec, Workload
from tokenmill.cli import main

APIS = ["openai-completions", "openai-chat", "tgi"]


@pytest.fixture(scope="module")
def fake():
    with FakeServer() as s:
        yield s


def _send(cfg: ClientConfig, prompt: str, n: int = 6) -> RequestRecord:
    async def go() -> RequestRecord:
        rec = RequestRecord(index=0, concurrency=1, prompt_tokens=len(prompt.split()),
                            max_tokens=n)
        async with aiohttp.ClientSession() as session:
            return await send_request(session, cfg, RequestSpec(prompt, 3, n), rec)

    return asyncio.run(go())


@pytest.mark.parametrize("api", APIS)
def test_stream_ok(fake: FakeServer, api: str) -> None:
    rec = _send(ClientConfig(fake.url, api, model="fake-model", api_key="k3y"), "a b c", n=6)
    assert fake.auth[-1] == "Bearer k3y"
    assert rec.ok and rec.status == 200 and rec.error is None
    assert rec.output_tokens == 6 and rec.token_source == ("details" if api == "tgi" else "usage")
    assert rec.server_prompt_tokens == 3
    assert len(rec.itl) == 5 and all(g >= 0 for g in rec.itl)
    assert 0 < rec.ttft <= rec.e2e  # type: ignore[operator]
    body = fake.bodies[-1]
    if api == "tgi":
        assert body["parameters"]["max_new_tokens"] == 6 and body["parameters"]["details"]
    else:
        assert body["max_tokens"] == 6 and body["ignore_eos"] and body["min_tokens"] == 6
        assert body["stream_options"] == {"include_usage": True}
        assert body["model"] == "fake-model"


@pytest.mark.parametrize("api", APIS)
def test_stream_without_server_counts(fake: FakeServer, api: str) -> None:
    rec = _send(ClientConfig(fake.url, api), "NOUSAGE x", n=5)
    assert fake.auth[-1] is None
    assert rec.ok and rec.output_tokens == 5 and rec.token_source == "chunks"


@pytest.mark.parametrize("api", APIS)
def test_errors(fake: FakeServer, api: str) -> None:
    cfg = ClientConfig(fake.url, api)
    rec = _send(cfg, "FAIL422")
    want = "too long" if api == "tgi" else "prompt too long"
    assert not rec.ok and rec.status == 422 and rec.error.startswith("HTTP 422: ")
    assert want in rec.error and rec.ttft is None
    rec = _send(cfg, "MIDERR now", n=8)
    assert not rec.ok and rec.status == 200
    assert rec.error in ("engine died", "Request failed during generation")
    assert rec.output_tokens == 2  # what arrived before the error


def test_plain_text_error_and_refused_connection(fake: FakeServer) -> None:
    rec = _send(ClientConfig(fake.url, "openai-completions"), "HTTP500")
    assert rec.error == "HTTP 500: internal oops"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    rec = _send(ClientConfig(f"http://127.0.0.1:{port}", "tgi"), "x")
    assert not rec.ok and rec.status is None and "Connect" in (rec.error or "")


def test_run_level_holds_concurrency(fake: FakeServer) -> None:
    fake.max_in_flight = 0
    w = Workload(LengthDist.parse("4"), LengthDist.parse("uniform:3:6"), seed=1)
    res = asyncio.run(run_level(ClientConfig(fake.url, "openai-completions"), w, 3,
                                requests=10))
    assert [r.index for r in res.records] == list(range(10))
    assert fake.max_in_flight == 3
    assert res.summary.requests == 10 and res.summary.errors == 0
    assert res.summary.output_tokens == sum(w.spec("c3", i).output_tokens for i in range(10))
    timed = asyncio.run(run_level(ClientConfig(fake.url, "tgi"), w, 2, duration=0.15))
    assert timed.summary.requests >= 2 and timed.duration_s >= 0.15


def test_cli_compare_json_and_plot(tmp_path, capsys) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    with FakeServer(delay=0.001) as fast, FakeServer(model="slow", delay=0.02) as slow:
        rc = main(["bench", "--url", fast.url, "--label", "fast", "--compare-url", slow.url,
                   "--compare-label", "slow", "--concurrency", "1,2", "--requests", "4",
                   "--prompt-tokens", "uniform:4:8", "--output-tokens", "8", "--warmup", "1",
                   "--json", str(out), "--plot", str(png), "--no-progress"])
        assert rc == 0
        # Both servers got the same workload (the warm-up request first).
        strip = [{k: v for k, v in b.items() if k != "model"} for b in fast.bodies]
        assert strip == [{k: v for k, v in b.items() if k != "model"} for b in slow.bodies]
        assert {b["model"] for b in slow.bodies} == {"slow"}  # from GET /v1/models
    text = capsys.readouterr().out
    assert "fast / slow" in text and "TTFT" in text
    doc = json.loads(out.read_text())
    assert doc["config"]["concurrency"] == [1, 2] and doc["config"]["requests_per_level"] == 4
    assert [r["label"] for r in doc["runs"]] == ["fast", "slow"]
    for run in doc["runs"]:
        assert len(run["warmup"]) == 1 and run["warmup"][0]["warmup"]
        assert [lv["concurrency"] for lv in run["levels"]] == [1, 2]
        for lv in run["levels"]:
            s = lv["summary"]
            assert s["requests"] == 4 and s["errors"] == 0 and s["output_tokens"] == 32
            for key in ("ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p99", "e2e_p50",
                        "e2e_p99", "output_tok_s", "req_s"):
                assert s[key] > 0
            assert len(lv["records"]) == 4 and all(r["ok"] for r in lv["records"])
    cmp = doc["comparison"]
    assert [c["concurrency"] for c in cmp] == [1, 2]
    # Each ratio is fast's figure over slow's, level by level (exact, not timing-dependent);
    # only the median inter-token gap (1 ms against 20 ms, 28 gaps a level) is compared
    # directly: a whole-level rate can be flipped by one stall of a loaded machine.
    fast_lv, slow_lv = (run["levels"] for run in doc["runs"])
    for c, fa, sl in zip(cmp, fast_lv, slow_lv):
        for key in ("output_tok_s", "req_s", "ttft_p50", "itl_p50", "e2e_p50"):
            assert c[key] == pytest.approx(fa["summary"][key] / sl["summary"][key])
        assert c["itl_p50"] < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_and_usage(fake: FakeServer, tmp_path, capsys, monkeypatch) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("fine prompt\nFAIL422 prompt\n")
    out = tmp_path / "e.json"
    rc = main(["bench", "--url", fake.url, "--api", "tgi", "--prompt-file", str(prompts),
               "--concurrency", "2", "--requests", "12", "--output-tokens", "3",
               "--warmup", "0", "--json", str(out), "--no-progress"])
    assert rc == 1  # some requests failed
    s = json.loads(out.read_text())["runs"][0]["levels"][0]["summary"]
    assert s["errors"] > 0 and s["requests"] > 0 and s["errors"] + s["requests"] == 12
    for argv in (["--concurrency", "0"], ["--concurrency", "a,b"], ["--requests", "0"],
                 ["--output-tokens", "uniform:9:1"], ["--prompt-file", str(tmp_path / "no")]):
        assert main(["bench", "--url", fake.url, *argv]) == 2
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["bench", "--url", fake.url, "--plot", str(tmp_path / "x.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err
    refused = ["bench", "--url", "http://127.0.0.1:9", "--no-progress", "--warmup", "1"]
    assert main(refused) == 1
    assert "every warm-up request failed" in capsys.readouterr().err
