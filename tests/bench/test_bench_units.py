"""Pure parts of the bench: percentiles, workloads, SSE parsing, stream shapes, summaries."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest

from tokenmill.bench.client import (
    ClientConfig,
    RequestRecord,
    StreamTimer,
    parse_chunk,
    request_body,
)
from tokenmill.bench.metrics import percentile, ratios, summarize
from tokenmill.bench.sse import SSEEvent, SSEParser
from tokenmill.bench.workload import (
    WORDS,
    LengthDist,
    RequestSpec,
    Workload,
    load_prompt_file,
)

# ---------------------------------------------------------------------------- percentiles


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_matches_numpy(n: int) -> None:
    xs = [random.Random(n).random() for _ in range(n)]
    for q in (0, 1, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# ---------------------------------------------------------------------------- workload


def test_length_dist_parse_and_sample() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("128").sample(rng) == 128
    u = LengthDist.parse("uniform:10:20")
    draws = [u.sample(rng) for _ in range(500)]
    assert min(draws) == 10 and max(draws) == 20 and u.mean == 15 and u.high == 20
    nrm = LengthDist.parse("normal:100:10")
    draws = [nrm.sample(rng) for _ in range(2000)]
    assert 98 < sum(draws) / len(draws) < 102 and min(draws) >= 1
    assert str(u) == "uniform:10:20" and str(LengthDist.parse(7)) == "7"
    for bad in ("0", "x", "uniform:5", "uniform:9:3", "normal:10:-1", "poisson:1:2"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


class SpaceTokenizer:
    """One token per whitespace-separated word (stands in for a real tokenizer)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [WORDS.index(w) for w in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(WORDS[i] for i in ids)


def test_workload_is_deterministic_and_fresh_per_salt() -> None:
    w = Workload(LengthDist.parse("uniform:5:40"), LengthDist.parse("normal:16:4"), seed=3)
    a, b = w.specs("c4", 20), Workload(w.prompt_tokens, w.output_tokens, seed=3).specs("c4", 20)
    assert a == b  # same seed and salt: same requests (what --compare-url relies on)
    assert w.specs("c8", 20) != a and Workload(w.prompt_tokens, w.output_tokens,
                                               seed=4).specs("c4", 20) != a
    for s in a:
        assert 5 <= s.prompt_tokens <= 40 and s.output_tokens >= 1
        assert len(s.prompt.split()) == s.prompt_tokens  # 1 word per token estimate
    assert len({tuple(s.prompt.split()[:4]) for s in a}) > 15  # distinct prefixes


def test_workload_exact_lengths_with_a_tokenizer() -> None:
    w = Workload(LengthDist.parse("64"), LengthDist.parse("8"), tokenizer=SpaceTokenizer())
    assert w.exact_prompt_tokens
    for s in w.specs("x", 5):
        assert s.prompt_tokens == 64 == len(SpaceTokenizer().encode(s.prompt))


def test_prompt_file(tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('plain line one two\n\n{"prompt": "a b c", "output_tokens": 5}\n'
                 '"just a string"\n{"text": "x y"}\n', encoding="utf-8")
    ps = load_prompt_file(f)
    assert [p.text for p in ps] == ["plain line one two", "a b c", "just a string", "x y"]
    assert [p.output_tokens for p in ps] == [None, 5, None, None]
    w = Workload(LengthDist.parse("9"), LengthDist.parse("7"), prompt_file=ps)
    specs = w.specs("c1", 40)
    assert {s.prompt for s in specs} == {p.text for p in ps}
    for s in specs:
        assert s.output_tokens == (5 if s.prompt == "a b c" else 7)
        assert s.prompt_tokens == len(s.prompt.split())
    for bad in ('{"prompt": 3}\n', '{"prompt": "x", "output_tokens": 0}\n', "{oops\n", "\n"):
        f.write_text(bad)
        with pytest.raises(ValueError):
            load_prompt_file(f)


# ---------------------------------------------------------------------------- SSE


def _feed_all(parts: list[bytes]) -> list[SSEEvent]:
    p = SSEParser()
    out = [ev for part in parts for ev in p.feed(part)]
    return out + p.close()


def test_sse_line_endings_comments_and_multiline() -> None:
    raw = (b": keep-alive\n\ndata: one\n\nevent: x\r\ndata: two\r\ndata:three\r\n\r\n"
           b"data: four\r\rid: 7\nretry: 5\ndata: 5\n\n")
    want = [SSEEvent("one"), SSEEvent("two\nthree", "x"), SSEEvent("four"), SSEEvent("5")]
    assert _feed_all([raw]) == want
    assert _feed_all([raw[i:i + 1] for i in range(len(raw))]) == want  # byte by byte


def test_sse_utf8_split_and_unterminated_last_event() -> None:
    raw = 'data: {"text": "é中🙂"}\n\ndata: [DONE]'.encode()
    cut = raw.index("中".encode()) + 1  # inside a multi-byte character
    assert _feed_all([raw[:cut], raw[cut:]]) == [SSEEvent('{"text": "é中🙂"}'),
                                                 SSEEvent("[DONE]")]
    assert _feed_all([b"data: a\r"]) == [SSEEvent("a")]  # CR held back, flushed at close
    assert _feed_all([b"data:\n\n", b"event: only\n\n"]) == [SSEEvent("")]


# ---------------------------------------------------------------------------- stream shapes


def test_parse_openai_completion_chunks() -> None:
    c = parse_chunk("openai-completions", json.dumps(
        {"choices": [{"index": 0, "text": " hi", "finish_reason": None}], "usage": None}))
    assert (c.tokens, c.final_tokens, c.error) == (1, None, None)
    c = parse_chunk("openai-completions", json.dumps(
        {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
    assert c.tokens == 0
    c = parse_chunk("openai-completions", json.dumps(
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}))
    assert (c.tokens, c.final_tokens, c.prompt_tokens) == (0, 9, 5)
    assert parse_chunk("openai-completions", " [DONE]").done
    c = parse_chunk("openai-completions", json.dumps(
        {"error": {"message": "boom", "type": "x", "http_status_code": 500}}))
    assert c.error == "boom"
    assert parse_chunk("openai-completions", "{not json").error.startswith("bad JSON")
    assert parse_chunk("openai-completions", "[1, 2]").error.startswith("unexpected")


def test_parse_openai_chat_chunks() -> None:
    def chunk(delta: dict) -> str:
        return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

    assert parse_chunk("openai-chat", chunk({"role": "assistant"})).tokens == 0
    assert parse_chunk("openai-chat", chunk({"role": "assistant", "content": ""})).tokens == 0
    assert parse_chunk("openai-chat", chunk({"role": "assistant", "content": "Hi"})).tokens == 1
    assert parse_chunk("openai-chat", chunk({"reasoning_content": "hmm"})).tokens == 1


def test_parse_tgi_events() -> None:
    tok = {"id": 5, "text": " a", "logprob": -0.1, "special": False}
    c = parse_chunk("tgi", json.dumps({"index": 1, "token": tok, "generated_text": None,
                                       "details": None}))
    assert (c.tokens, c.final_tokens) == (1, None)
    c = parse_chunk("tgi", json.dumps({"index": 2, "token": tok, "generated_text": "x",
                                       "details": {"finish_reason": "length",
                                                   "generated_tokens": 2, "seed": None,
                                                   "input_length": 7}}))
    assert (c.tokens, c.final_tokens, c.prompt_tokens) == (1, 2, 7)
    c = parse_chunk("tgi", json.dumps({"error": "Request failed during generation",
                                       "error_type": "generation"}))
    assert c.error == "Request failed during generation"


def test_request_bodies() -> None:
    spec = RequestSpec("hello world", 2, 16)
    b = request_body(ClientConfig("http://x", "openai-completions", model="m"), spec)
    assert b == {"model": "m", "prompt": "hello world", "max_tokens": 16, "stream": True,
                 "stream_options": {"include_usage": True}, "temperature": 0.0,
                 "ignore_eos": True, "min_tokens": 16}
    b = request_body(ClientConfig("http://x", "openai-chat", ignore_eos=False), spec)
    assert b["messages"] == [{"role": "user", "content": "hello world"}]
    assert b["model"] == "tgi" and "ignore_eos" not in b and "min_tokens" not in b
    b = request_body(ClientConfig("http://x", "tgi", temperature=0.5), spec)
    assert b == {"inputs": "hello world", "stream": True, "parameters": {
        "max_new_tokens": 16, "details": True, "decoder_input_details": False,
        "do_sample": True, "temperature": 0.5, "ignore_eos": True}}


def test_stream_timer_counts_and_timings() -> None:
    rec = RequestRecord(index=0, concurrency=1, prompt_tokens=3, max_tokens=3)
    t = StreamTimer("openai-chat", rec, t_sent=10.0)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    t.on_event(json.dumps(role), 10.1)
    for i, now in enumerate((10.5, 10.7, 11.0)):
        t.on_event(json.dumps({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}), now)
    t.finish(11.2)
    assert rec.ok and rec.output_tokens == 3 and rec.token_source == "chunks"
    assert rec.ttft == pytest.approx(0.5) and rec.e2e == pytest.approx(1.2)
    assert rec.itl == pytest.approx([0.2, 0.3])
    empty = StreamTimer("tgi", RequestRecord(index=1, concurrency=1, prompt_tokens=1,
                                             max_tokens=1), 0.0).finish(1.0)
    assert not empty.ok and empty.error == "no tokens in the stream"


# ---------------------------------------------------------------------------- summaries


def _rec(i: int, ttft: float, e2e: float, n: int, ok: bool = True) -> RequestRecord:
    gap = (e2e - ttft) / (n - 1)
    return RequestRecord(index=i, concurrency=2, prompt_tokens=10, max_tokens=n, ok=ok,
                         ttft=ttft, e2e=e2e, output_tokens=n, itl=[gap] * (n - 1),
                         error=None if ok else "x")


def test_summarize_and_ratios() -> None:
    recs = [_rec(0, 0.1, 1.1, 11), _rec(1, 0.3, 2.3, 11), _rec(2, 9.0, 9.0, 2, ok=False)]
    s = summarize(2, recs, duration_s=2.5)
    assert (s.requests, s.errors, s.output_tokens, s.prompt_tokens) == (2, 1, 22, 20)
    assert s.output_tok_s == pytest.approx(22 / 2.5) and s.req_s == pytest.approx(0.8)
    assert s.ttft_p50 == pytest.approx(0.2) and s.e2e_p99 == pytest.approx(1.1 + 1.2 * 0.99)
    assert s.itl_p50 == pytest.approx(0.15) and s.tpot_mean == pytest.approx(0.15)
    d = s.to_dict()
    assert d["concurrency"] == 2 and json.dumps(d)
    empty = summarize(4, [], 1.0)
    assert math.isnan(empty.ttft_p50) and empty.to_dict()["ttft_p50"] is None
    r = ratios(s, summarize(2, recs[:1], duration_s=2.5))
    assert r["output_tok_s"] == pytest.approx(2.0) and r["ttft_p50"] == pytest.approx(2.0)
    assert math.isnan(ratios(s, empty)["output_tok_s"])


def test_bench_does_not_import_torch() -> None:
    code = ("import sys, tokenmill.cli, tokenmill.bench.cli, tokenmill.bench.runner, "
            "tokenmill.bench.report, tokenmill.bench.workload, tokenmill.bench.metrics; "
            "tokenmill.cli.build_parser().parse_args(['bench']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_shows_defaults_only_where_they_say_something() -> None:
    """`tokenmill bench --help` names real defaults, never "(default: None)" nor a switch's
    True/False, and no default twice."""
    import argparse

    from tokenmill.bench.cli import add_bench_parser

    parser = argparse.ArgumentParser(prog="tokenmill")
    text = add_bench_parser(parser.add_subparsers()).format_help()
    flat = " ".join(text.split())
    assert "(default: None)" not in flat
    assert "(default: True)" not in flat and "(default: False)" not in flat
    assert "(default: 600.0)" in flat  # --timeout
    assert flat.count("(default: env API_KEY)") == 1 and "API_KEY) (default" not in flat
