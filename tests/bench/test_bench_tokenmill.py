"""Short bench runs against a real `tokenmill serve`: the report's numbers must agree with the
server's own Prometheus counters (deltas over the run)."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict

import httpx2 as httpx

from tokenmill.cli import main

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})? (\S+)$")


def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {metric name: value summed over label sets}."""
    out: dict[str, float] = defaultdict(float)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] += float(m.group(3))
    return out


COUNTERS = ("tgi_request_count", "tgi_request_success", "tgi_request_generated_tokens_sum",
            "tgi_request_generated_tokens_count")


def deltas_after(url: str, before: dict[str, float], requests: int) -> dict[str, float]:
    # TGI streams are recorded just after their last event is sent: allow a moment.
    for _ in range(40):
        after = scrape(url)
        d = {k: after[k] - before[k] for k in COUNTERS}
        if d["tgi_request_success"] >= requests:
            return d
        time.sleep(0.05)
    return d


def bench(tmp_path, url: str, *argv: str) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", "--url", url, "--json", str(out), "--no-progress", *argv]) == 0
    return json.loads(out.read_text())


def all_records(doc: dict) -> list[dict]:
    run = doc["runs"][0]
    return run["warmup"] + [r for lv in run["levels"] for r in lv["records"]]


def test_completions_sweep_matches_server_metrics(tm_server, tmp_path) -> None:
    before = scrape(tm_server.url)
    doc = bench(tmp_path, tm_server.url, "--api", "openai-completions", "--concurrency", "1,2",
                "--requests", "4", "--prompt-tokens", "16", "--output-tokens", "8",
                "--warmup", "1", "--tokenizer", "default")
    recs = all_records(doc)
    assert len(recs) == 9 and all(r["ok"] for r in recs)
    d = deltas_after(tm_server.url, before, len(recs))
    assert d["tgi_request_count"] == d["tgi_request_success"] == len(recs)
    assert d["tgi_request_generated_tokens_count"] == len(recs)
    # ignore_eos + min_tokens: exactly the asked-for length, counted by the server's usage.
    assert {(r["output_tokens"], r["token_source"]) for r in recs} == {(8, "usage")}
    assert d["tgi_request_generated_tokens_sum"] == sum(r["output_tokens"] for r in recs)
    # --tokenizer: the prompt lengths the bench made are the ones the server counted.
    assert doc["config"]["exact_prompt_tokens"]
    assert all(r["server_prompt_tokens"] == r["prompt_tokens"] == 16 for r in recs)
    run = doc["runs"][0]
    assert run["model"] and run["server_info"]["model_id"]
    for lv in run["levels"]:
        s = lv["summary"]
        assert (s["requests"], s["errors"], s["output_tokens"]) == (4, 0, 32)
        assert s["prompt_tokens"] == 64
        assert 0 < s["ttft_p50"] <= s["ttft_p90"] <= s["ttft_p99"] < s["e2e_p99"]
        assert 0 < s["itl_p50"] <= s["itl_p99"] and 0 < s["e2e_p50"] <= s["e2e_p99"]
        assert s["output_tok_s"] == s["output_tokens"] / s["duration_s"]
        assert s["req_s"] == 4 / s["duration_s"]
        assert all(len(r["itl"]) == 7 for r in lv["records"])


def test_tgi_and_chat_apis_match_server_metrics(tm_server, tmp_path) -> None:
    for api, source in (("tgi", "details"), ("openai-chat", "usage")):
        before = scrape(tm_server.url)
        doc = bench(tmp_path, tm_server.url, "--api", api, "--concurrency", "2",
                    "--requests", "2", "--prompt-tokens", "12", "--output-tokens", "8",
                    "--warmup", "0")
        recs = all_records(doc)
        assert len(recs) == 2 and all(r["ok"] and r["token_source"] == source for r in recs)
        d = deltas_after(tm_server.url, before, 2)
        assert d["tgi_request_count"] == d["tgi_request_success"] == 2
        assert d["tgi_request_generated_tokens_sum"] == sum(r["output_tokens"] for r in recs)
        assert all(1 <= r["output_tokens"] <= 8 for r in recs)
