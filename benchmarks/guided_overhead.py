"""Decode throughput of 32 concurrent JSON-schema requests as a ratio to 32 free requests in the
same process (issue 6's goal: >= 0.9x).

The constrained run goes first (greedy, so it is deterministic) and records how many tokens
each request produced, EOS included; the free run then gives the same prompts exactly those
budgets with ``ignore_eos``, so both decode the same number of tokens with the same batch-size
profile and the ratio isolates the cost of the grammar (masks, bias, matcher updates). Rounds
alternate and the best of each is kept, since the CI machine is shared.

    .venv/bin/python benchmarks/guided_overhead.py [--dtype bfloat16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tokenmill.frontend.llm_engine import LLMEngine
from tokenmill.llm import LLM
from tokenmill.protocol import GrammarSpec, SamplingParams

NAME = {"type": "string", "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"people": {"type": "array", "minItems": 3, "maxItems": 3,
        "items": {"type": "object", "properties": {"name": NAME, "age": {
            "type": "integer", "minimum": 0, "maximum": 120}, "city": NAME},
            "required": ["name", "age", "city"], "additionalProperties": False}}},
     "required": ["people"], "additionalProperties": False},
    {"type": "object", "properties": {"title": NAME, "tags": {"type": "array", "minItems": 4,
        "maxItems": 6, "items": {"enum": ["news", "tech", "sport", "art", "food", "travel"]}},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5}, "summary": {
            "type": "string", "minLength": 20, "maxLength": 60}},
     "required": ["title", "tags", "rating", "summary"], "additionalProperties": False},
    {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "lines": {"type": "array", "minItems": 2, "maxItems": 4, "items": {"type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "paid": {"type": "boolean"}}, "required": ["order_id", "lines", "paid"],
     "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {
        "type": "integer", "minimum": 1, "maximum": 100}, "label": NAME},
        "required": ["kind", "radius", "label"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "integer"},
                                          "h": {"type": "integer"}, "label": NAME},
         "required": ["kind", "w", "h", "label"], "additionalProperties": False}]},
]
TOPICS = ["three people and their cities", "a news article", "a shop order", "a shape"]


def prompts(llm: LLM, n: int) -> list[list[int]]:
    tok = llm.tokenizer
    out = []
    for i in range(n):
        text = f"Reply in JSON: {TOPICS[i % len(TOPICS)]} (variant {i})."
        p = tok.apply_chat_template([{"role": "user", "content": text}],
                                    add_generation_prompt=True)
        out.append(tok.encode(p, add_special_tokens=False))
    return out


def decode_run(eng: LLMEngine, ids: list[list[int]], params: list[SamplingParams]
               ) -> tuple[float, list[int]]:
    """Decode tokens/s once every request has its first token; tokens per request."""
    rids = [eng.add_request(p, sp) for p, sp in zip(ids, params)]
    counts = dict.fromkeys(rids, 0)
    started, t0, n = set(), 0.0, 0
    while eng.has_unfinished:
        outs = eng.step()
        if len(started) == len(rids):
            n += sum(len(o.new_token_ids) for o in outs)
        for o in outs:
            counts[o.request_id] += len(o.new_token_ids)
            started.add(o.request_id)
        if not t0 and len(started) == len(rids):
            t0 = time.perf_counter()
    return n / (time.perf_counter() - t0), [counts[r] for r in rids]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    load1, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    print(f"load average {load1:.2f} on {cores} cores"
          + ("  ** machine busy: ratios are less reliable **" if load1 > 0.5 * cores else ""))
    llm = LLM(dtype=a.dtype, max_batch_total_tokens=32768)
    eng = llm.engine
    ids = prompts(llm, a.requests)
    guided = [SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0.0,
                             grammar=GrammarSpec(kind="json", value=json.dumps(
                                 SCHEMAS[i % len(SCHEMAS)])))
              for i in range(a.requests)]
    t0 = time.perf_counter()
    _, lengths = decode_run(eng, ids, guided)  # warm-up: grammar tokenizer, compiles
    print(f"warm-up (grammar tokenizer + {len(SCHEMAS)} compiles + run): "
          f"{time.perf_counter() - t0:.1f}s; tokens per request {min(lengths)}-{max(lengths)}, "
          f"total {sum(lengths)}")
    free = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    best = {"free": 0.0, "guided": 0.0}
    for r in range(a.rounds):
        for name, params in (("free", free), ("guided", guided)):
            tps, counts = decode_run(eng, ids, params)
            assert counts == lengths, "both runs must decode the same tokens"
            best[name] = max(best[name], tps)
            print(f"  round {r}: {name:6s} {tps:7.1f} tok/s")
    print(f"{eng.info.dtype}, {a.requests} concurrent requests, {sum(lengths)} tokens each run")
    print(f"free {best['free']:.1f} tok/s, guided {best['guided']:.1f} tok/s, "
          f"ratio {best['guided'] / best['free']:.3f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
