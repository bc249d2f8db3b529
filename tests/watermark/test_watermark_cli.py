"""`--watermark-gamma` / `--watermark-delta` (and their env vars), `generate --watermark`, and
`tokenmill watermark detect` on texts built from the default tokenizer."""

from __future__ import annotations

import io
import json
import random

import pytest

from tokenmill.cli import _engine_kwargs, build_parser, main
from tokenmill.watermark import is_green

WORDS = ["river", "stone", "light", "garden", "number", "engine", "market", "winter", "letter",
         "silver", "forest", "question", "music", "window", "history", "planet", "water", "house",
         "paper", "money", "city", "table", "story", "power", "night", "family", "school", "world",
         "friend", "mother", "father", "people", "animal", "summer", "country", "picture",
         "mountain", "island", "ocean", "kitchen", "doctor"]


def test_flags_env_vars_and_engine_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    a = build_parser().parse_args(["serve"])
    assert (a.watermark_gamma, a.watermark_delta) == (0.5, 2.0)
    monkeypatch.setenv("WATERMARK_GAMMA", "0.25")
    monkeypatch.setenv("WATERMARK_DELTA", "3")
    a = build_parser().parse_args(["serve"])
    assert (a.watermark_gamma, a.watermark_delta) == (0.25, 3.0)
    a = build_parser().parse_args(["launch", "--watermark-delta", "1.5"])  # flag beats env
    kw = _engine_kwargs(a)
    assert (kw["watermark_gamma"], kw["watermark_delta"]) == (0.25, 1.5)
    g = build_parser().parse_args(["generate", "--watermark", "hi"])
    assert g.watermark and g.watermark_gamma == 0.25


@pytest.mark.parametrize("flags, message", [
    (["--watermark-gamma", "1.5"], "--watermark-gamma must be > 0 and < 1, got 1.5"),
    (["--watermark-gamma", "0"], "--watermark-gamma must be > 0 and < 1, got 0.0"),
    (["--watermark-delta", "-1"], "--watermark-delta must be >= 0 and finite, got -1.0"),
])
def test_bad_values_stop_the_start(flags: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *flags]) == 2  # before any model or port is touched
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_detect_needs_one_input(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["watermark", "detect"]) == 2
    assert "give the text, --file F, or - to read stdin" in capsys.readouterr().err
    f = tmp_path / "t.txt"
    f.write_text("x")
    assert main(["watermark", "detect", "--file", str(f), "text"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["watermark", "detect", "--file", str(tmp_path / "missing.txt")]) == 2
    assert main(["watermark", "detect", "--gamma", "1.0", "some text"]) == 2


def green_text(tok, gamma: float, n: int, seed: int = 0) -> str:
    """n words, each (as its own ' word' token) in the green list of the one before."""
    ids = {w: tok.encode(" " + w, add_special_tokens=False) for w in WORDS}
    single = [w for w in WORDS if len(ids[w]) == 1]
    rng = random.Random(seed)
    words = [rng.choice(single)]
    while len(words) < n:
        prev = ids[words[-1]][0]
        options = [w for w in single if is_green(prev, ids[w][0], gamma)]
        words.append(rng.choice(options))
    return "".join(" " + w for w in words)


def detect(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["watermark", "detect", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_detect_text_file_and_stdin(capsys: pytest.CaptureFixture[str], tmp_path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.frontend.llm_engine import load_tokenizer
    from tokenmill.loader import resolve_model

    tok = load_tokenizer(resolve_model(None))
    text = green_text(tok, 0.5, 60)
    r = detect([text], capsys)
    assert r["num_tokens"] == 60 and r["num_green"] == r["num_scored"] > 50
    assert r["watermarked"] and r["z_score"] > 7 and r["gamma"] == 0.5
    # A text green for gamma = 0.25, from a file; scored with that gamma (flag, then env).
    low = green_text(tok, 0.25, 60, seed=1)
    f = tmp_path / "low.txt"
    f.write_text(low)
    assert detect(["--file", str(f), "--gamma", "0.25"], capsys)["z_score"] > 12
    monkeypatch.setenv("WATERMARK_GAMMA", "0.25")  # the server's env var also sets --gamma
    assert detect(["--file", str(f)], capsys)["gamma"] == 0.25
    monkeypatch.delenv("WATERMARK_GAMMA")
    # Ordinary text: no watermark. stdin with "-", human-readable output.
    plain = ("Licensed under the Apache License, Version 2.0 (the License); you may not use "
             "this file except in compliance with the License. You may obtain a copy of the "
             "License at the address below. Unless required by applicable law or agreed to in "
             "writing, software distributed under the License is distributed on an AS IS "
             "BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.")
    monkeypatch.setattr("sys.stdin", io.StringIO(plain))
    assert main(["watermark", "detect", "-"]) == 0
    out = capsys.readouterr().out
    assert "verdict: not watermarked (threshold z > 4)" in out and "z-score: " in out
    r = detect(["--threshold", "-100", plain], capsys)
    assert r["watermarked"] and r["threshold"] == -100 and abs(r["z_score"]) < 3
