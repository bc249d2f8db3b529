"""`tokenmill watermark detect`: score a text for the watermark. Only the tokenizer is loaded."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tokenmill.watermark.scheme import WatermarkScore, score_tokens


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw else default


def add_watermark_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `watermark detect` on the `tokenmill` command's subparsers."""
    p = subparsers.add_parser("watermark", help="Kirchenbauer watermark tools")
    sub = p.add_subparsers(dest="watermark_command", required=True)
    d = sub.add_parser(
        "detect", help="z-score of a text against the watermark (needs only the tokenizer)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("text", nargs="?", default=None, help="the text, or - to read stdin")
    d.add_argument("--file", default=None, help="read the text from this file")
    d.add_argument("--model", "--model-id", dest="model_id",
                   default=os.environ.get("MODEL_ID") or None,
                   help="model whose tokenizer generated the text (default: the default model)")
    d.add_argument("--revision", default=None)
    # The server's gamma: the same env var as `serve --watermark-gamma`.
    d.add_argument("--gamma", "--watermark-gamma", dest="gamma", type=float,
                   default=_env_float("WATERMARK_GAMMA", 0.5),
                   help="green fraction the text was generated with")
    d.add_argument("--threshold", type=float, default=4.0, help="verdict: watermarked if z > this")
    d.add_argument("--count-repeated-bigrams", action="store_true",
                   help="score every token; by default a repeated (previous, token) pair counts "
                        "once, so repetitive text cannot fake a high z")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_detect)
    return p


def _read_text(a: argparse.Namespace) -> str:
    if a.file is not None:
        if a.text is not None:
            raise ValueError("give TEXT or --file, not both")
        with open(a.file, encoding="utf-8") as f:
            return f.read()
    if a.text is None:
        raise ValueError("give the text, --file F, or - to read stdin")
    return sys.stdin.read() if a.text == "-" else str(a.text)


def report(score: WatermarkScore, threshold: float, ignore_repeated: bool) -> dict[str, Any]:
    return {"num_tokens": score.num_tokens, "num_scored": score.num_scored,
            "num_green": score.num_green, "green_fraction": score.green_fraction,
            "gamma": score.gamma, "z_score": score.z, "p_value": score.p_value,
            "threshold": threshold, "watermarked": score.z > threshold,
            "ignore_repeated_bigrams": ignore_repeated}


def cmd_detect(a: argparse.Namespace) -> int:
    from tokenmill.frontend.llm_engine import load_tokenizer
    from tokenmill.loader import ModelLoadError, resolve_model

    try:
        text = _read_text(a)
        ignore = not a.count_repeated_bigrams
        tok = load_tokenizer(resolve_model(a.model_id, revision=a.revision))
        score = score_tokens(tok.encode(text, add_special_tokens=False), a.gamma,
                             ignore_repeated_bigrams=ignore)
    except (OSError, ValueError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = report(score, a.threshold, ignore)
    if a.json:
        print(json.dumps(r))
        return 0
    skipped = " (repeated bigrams once)" if ignore else ""
    print(f"tokens: {score.num_tokens}, scored: {score.num_scored}{skipped}")
    print(f"green: {score.num_green} ({score.green_fraction:.1%}; {score.gamma:.1%} expected "
          "without a watermark)")
    print(f"z-score: {score.z:.2f} (p = {score.p_value:.3g})")
    verdict = "watermarked" if r["watermarked"] else "not watermarked"
    print(f"verdict: {verdict} (threshold z > {a.threshold:g})")
    return 0
