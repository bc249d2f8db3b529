"""`parameters.watermark: true` on TGI's routes, with gamma and delta from the launcher
(`--watermark-gamma` flag, WATERMARK_DELTA env var), checked by `tokenmill watermark detect`."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
from server_proc import ServerProcess

from tokenmill.cli import main

GAMMA = "0.25"
PROMPT = ("<|im_start|>user\nWrite a long story about a dragon who learns to paint."
          "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def wm_server():
    s = ServerProcess("--watermark-gamma", GAMMA, env={"WATERMARK_DELTA": "3.0"})
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def generate(url: str, watermark: bool) -> dict:
    r = httpx.post(f"{url}/generate", timeout=300, json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 120, "do_sample": True, "temperature": 1.0, "seed": 11,
        "watermark": watermark, "details": True}})
    assert r.status_code == 200, r.text
    return r.json()


def detect(text: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["watermark", "detect", "--json", "--gamma", GAMMA, text]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_with_watermark_is_detected(wm_server, capsys) -> None:
    marked = generate(wm_server.url, True)
    plain = generate(wm_server.url, False)
    assert marked["details"]["generated_tokens"] >= 60
    assert marked["generated_text"] != plain["generated_text"]
    got = detect(marked["generated_text"], capsys)
    assert got["watermarked"] and got["z_score"] > 4, got
    control = detect(plain["generated_text"], capsys)
    print(f"HTTP watermark z={got['z_score']:.2f} ({got['num_green']}/{got['num_scored']}), "
          f"control z={control['z_score']:.2f}")
    assert not control["watermarked"] and abs(control["z_score"]) < 2.5, control
    # The stream carries the same watermarked tokens (same seed).
    text = None
    with httpx.stream("POST", f"{wm_server.url}/generate_stream", timeout=300, json={
            "inputs": PROMPT, "parameters": {"max_new_tokens": 120, "do_sample": True,
                                             "temperature": 1.0, "seed": 11,
                                             "watermark": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                ev = json.loads(line[5:])
                assert "error" not in ev, ev
                text = ev["generated_text"] or text
    assert text == marked["generated_text"]
